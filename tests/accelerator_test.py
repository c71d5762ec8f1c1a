"""bench/accelerator.py end to end at toy sizes on CPU (--smoke), so the prepared accelerator run is known to
work before an accelerator is used; its figures are checked against what the formats allow."""

import json
import math
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AcceleratorSmokeTest(absltest.TestCase):

  def test_smoke_run(self):
    out = os.path.join(tempfile.mkdtemp(), 'accelerator.json')
    done = subprocess.run([sys.executable, 'bench/accelerator.py', '--smoke', f'--out={out}', '--runs=1'],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-3000:])
    report = json.load(open(out))
    for name in ('fp8_gemm', 'grouped_fp8_gemm', 'attention', 'train_step', 'decode'):
      self.assertNotIn('error', report[name], name)
    # Rounding to e4m3 (3 mantissa bits) errs by up to 2^-4 relative, RMS 2^-4 / sqrt(3) = 0.036, per
    # operand; bf16 (8 bits) by 2^-8 / sqrt(3). A product's relative error is at most the two added.
    for row in report['fp8_gemm'] + report['grouped_fp8_gemm']:
      self.assertLess(row['fp8_rel_error'], 2 * 2 ** -4 / math.sqrt(3))
      self.assertLess(row['bf16_rel_error'], 2 * 2 ** -8 / math.sqrt(3))
    attention = report['attention']
    self.assertEqual(attention['impl'], 'flash')
    self.assertLess(attention['flash_rel_error_vs_fp32_dense'], 2 ** -6)  # bf16 inputs and output
    train = report['train_step']
    # At initialization the predictions are near uniform: CE ~ ln(vocab) for the head and MTP's 0.3 x.
    uniform = 1.3 * math.log(256)
    for form in ('bf16', 'fp8'):
      self.assertAlmostEqual(train[form]['loss'] / uniform, 1.0, delta=0.1)
      self.assertGreater(train[form]['tokens_per_second'], 0)
    for rows in report['decode'].values():
      for row in rows.values():
        self.assertGreater(row['tokens_per_second'], 0)
        self.assertGreater(row['verify_over_plain'], 0)

  def test_merge_marks_a_killed_section_and_keeps_the_others(self):
    # One process per section on a lent machine: a section killed at its limit leaves no file (or a partial
    # one); the merge must say so rather than drop it, and keep the figures of the sections that finished.
    folder = tempfile.mkdtemp()
    head = {'device': 'NVIDIA H200', 'backend': 'gpu', 'smoke': False, 'kernels': 'pallas', 'jax': '0.11.2'}
    attention = {'t': 4096, 'heads': 128, 'impl': 'flash', 'flash_forward_tflops': 45.0,
                 'flash_forward_backward_tflops': 64.0, 'flash_rel_error_vs_fp32_dense': 2e-3}
    partial_decode = {'bf16': {'1': {'step_ms': 2.5, 'tokens_per_second': 400.0, 'verify_2_tokens_ms': 3.0,
                                     'verify_over_plain': 1.2, 'break_even_acceptance': 0.2}}}
    json.dump({**head, 'attention': attention, 'attention_seconds': 20.0}, open(f'{folder}/attention.json', 'w'))
    json.dump({**head, 'decode': partial_decode}, open(f'{folder}/decode.json', 'w'))
    with open(f'{folder}/log', 'w') as f:
      f.write('== fp8_gemm (limit 80 s)\nnoise\nrc=124\n== attention (limit 70 s)\nrc=0\n'
              '== decode (limit 195 s)\nrc=137\n')
    sys.path.insert(0, REPO)
    from bench import accelerator
    report = accelerator.merge(folder)
    self.assertEqual(report['fp8_gemm'], {'error': 'killed at its 80 s limit'})
    self.assertEqual(report['attention'], attention)
    self.assertEqual(report['decode']['error'], 'killed at its 195 s limit')
    self.assertEqual(report['decode']['bf16'], partial_decode['bf16'])
    text = accelerator.docs_section(report, 'docs/accelerator/x.json')
    self.assertIn('fp8_gemm: **killed at its 80 s limit**', text)
    self.assertIn('| flash | 45.0 | 64.0 |', text)
    self.assertIn('| bf16 | 1 | 2.50 | 400 | 3.00 | 1.20 | gather / gather |', text)


if __name__ == '__main__':
  absltest.main()
