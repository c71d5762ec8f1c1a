"""notebooks/quickstart.ipynb runs headlessly from top to bottom."""

import os

from absl.testing import absltest

from tests.helpers import require

nbclient = require('nbclient')
nbformat = require('nbformat')

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'notebooks', 'quickstart.ipynb')


class NotebookTest(absltest.TestCase):

  def test_quickstart_executes(self):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [o.get('text', '') for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
    text = ''.join(outputs)
    self.assertIn('next-token CE', text)
    first, last = (float(x) for x in text.split('next-token CE: ')[1].split(';')[0].split(' -> '))
    self.assertLess(last, first)
    self.assertTrue(any(o.get('output_type') == 'display_data' for cell in notebook.cells
                        for o in cell.get('outputs', [])))  # the loss plot
