"""The code prompts the decoding benchmarks give the trained demo run (it trained on Python source)."""

CODE_PROMPTS = ('def ', 'import os\n', 'class Parser(object):\n    def ', 'for i in range(', '    return self.',
                '# Copyright', 'if __name__ == "__main__":\n    ', 'try:\n    import ')
