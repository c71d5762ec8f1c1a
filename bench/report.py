"""docs/benchmarks.md: each benchmark script owns one section and rewrites it with its latest figures."""

import os

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'benchmarks.md')
HEADER = ('# Benchmarks\n\nEvery figure comes from a script in `bench/`, run on the machine named in its section; '
          'rerun the command to refresh it.\n')


def replace_section(title: str, body: str) -> None:
  """Replaces (or appends) the `## title` section of docs/benchmarks.md."""
  text = open(PATH).read() if os.path.exists(PATH) else HEADER
  marker = f'## {title}\n'
  section = f'{marker}\n{body.strip()}\n'
  if marker in text:
    start = text.index(marker)
    end = text.find('\n## ', start + len(marker))
    text = text[:start] + section + (text[end:] if end != -1 else '')
  else:
    text = text.rstrip('\n') + '\n\n' + section
  os.makedirs(os.path.dirname(PATH), exist_ok=True)
  with open(PATH, 'w') as f:
    f.write(text)
