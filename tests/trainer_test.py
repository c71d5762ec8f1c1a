"""The training launcher end to end, in subprocesses: kill -9 and resume, SIGTERM, a damaged checkpoint.

Every run uses configs/tiny.py (a 0.25M-parameter model on 40 standard-library files). The runs share the
test session's JAX compilation cache (conftest.py), so only the first one compiles.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


class LauncherTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = absltest.get_default_test_tmpdir()
    cls.env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}  # conftest's XLA flags and compilation cache
    cls.reference = cls.fresh('uninterrupted')
    result = cls.launch(cls.reference).wait(timeout=600)
    assert result == 0, f'uninterrupted run failed with {result}'

  @classmethod
  def fresh(cls, name):
    """An empty run directory, and an empty log for it (logs are appended to across a test's launches)."""
    workdir = os.path.join(cls.root, name)
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(workdir + '.log'):
      os.remove(workdir + '.log')
    return workdir

  @classmethod
  def launch(cls, workdir, *overrides):
    command = [sys.executable, '-m', 'launch.train', '--config=configs/tiny.py', f'--workdir={workdir}',
               f'--config.steps={STEPS}', '--config.checkpoint_every=5', *overrides]
    log = open(workdir + '.log', 'a')
    return subprocess.Popen(command, cwd=REPO, env=cls.env, stdout=log, stderr=subprocess.STDOUT)

  def losses(self, workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual([r['step'] for r in records], list(range(1, len(records) + 1)))  # no gaps, no repeats
    return [r['loss'] for r in records]

  def log_text(self, workdir):
    with open(workdir + '.log') as f:
      return f.read()

  def wait_for_step(self, process, workdir, step, timeout=300):
    deadline = time.time() + timeout
    path = os.path.join(workdir, 'metrics.jsonl')
    while time.time() < deadline:
      if os.path.exists(path) and sum(1 for _ in open(path)) >= step:
        return
      if process.poll() is not None:
        self.fail(f'run ended early with {process.returncode}:\n{self.log_text(workdir)[-3000:]}')
      time.sleep(0.2)
    process.kill()
    self.fail(f'no step {step} within {timeout}s')

  def test_reference_run_outputs(self):
    losses = self.losses(self.reference)
    self.assertLen(losses, STEPS)
    self.assertLess(losses[-1], losses[0] - 1.0)  # it learns
    for name in ('loss.png', 'sample.txt', 'data/tokenizer.json'):
      self.assertTrue(os.path.exists(os.path.join(self.reference, name)), name)
    with open(os.path.join(self.reference, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    self.assertIn('val_loss', records[-1])
    self.assertIn('load_max_over_mean/layer1', records[-1])  # the first MoE layer of the tiny model
    self.assertTrue(os.listdir(os.path.join(self.reference, 'tensorboard')))
    self.assertIn('sample:', self.log_text(self.reference))
    from deepseek_jax.trainer import restore_model
    _, _, step = restore_model(os.path.relpath(self.reference))  # relative, as the README's decode command
    self.assertEqual(step, STEPS)

  @pytest.mark.slow  # generate_test proves speculative == plain; tokenizer_test runs launch.decode by default
  def test_decode_speculative_prints_the_plain_text(self):
    def decode(*flags):
      done = subprocess.run([sys.executable, '-m', 'launch.decode', f'--workdir={self.reference}', '--prompt=def ',
                             '--max_new_tokens=24', '--temperature=0', *flags], cwd=REPO, env=self.env,
                            capture_output=True, text=True, timeout=300)
      self.assertEqual(done.returncode, 0, done.stderr[-3000:])
      text, report = re.split(r'\n(?=\d+ tokens in \d+ decode steps)', done.stdout, maxsplit=1)
      return text, report

    plain, plain_report = decode()
    spec, spec_report = decode('--speculative=mtp')
    self.assertTrue(plain.startswith('def '))
    self.assertEqual(spec, plain)  # lossless: the same greedy text
    self.assertIn('tokens/s', plain_report)
    self.assertRegex(spec_report, r'MTP acceptance: \d+/\d+')
    with self.assertRaises(subprocess.CalledProcessError):  # a clear error for a directory that is not a run
      subprocess.run([sys.executable, '-m', 'launch.decode', f'--workdir={self.root}', '--prompt=x'], cwd=REPO,
                     env=self.env, capture_output=True, text=True, timeout=300, check=True)

  def test_kill_9_then_rerun_matches_bitwise(self):
    workdir = self.fresh('killed')
    process = self.launch(workdir)
    self.wait_for_step(process, workdir, 13)  # past the checkpoint at step 10
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    self.assertEqual(self.launch(workdir).wait(timeout=600), 0)
    self.assertIn('resumed from step', self.log_text(workdir))
    self.assertEqual(self.losses(workdir), self.losses(self.reference))  # float equality, every step

  def test_sigterm_saves_and_exits_zero(self):
    workdir = self.fresh('preempted')
    process = self.launch(workdir)
    self.wait_for_step(process, workdir, 7)
    process.send_signal(signal.SIGTERM)
    self.assertEqual(process.wait(timeout=120), 0)
    log = self.log_text(workdir)
    self.assertIn('stop requested (SIGTERM)', log)
    saved = int(re.search(r'stop requested \(SIGTERM\): saved step (\d+)', log).group(1))
    self.assertIn(str(saved), os.listdir(os.path.join(workdir, 'checkpoints')))
    self.assertGreaterEqual(saved, 7)
    self.assertEqual(self.launch(workdir).wait(timeout=600), 0)
    self.assertEqual(self.losses(workdir), self.losses(self.reference))

  def test_damaged_newest_checkpoint_falls_back(self):
    workdir = self.fresh('damaged')
    shutil.copytree(self.reference, workdir)
    checkpoints = os.path.join(workdir, 'checkpoints')
    steps = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())
    newest, previous = steps[-1], steps[-2]
    for folder, _, files in os.walk(os.path.join(checkpoints, str(newest), 'state')):
      for name in files:
        if name.startswith('manifest') or folder.endswith(os.sep + 'd'):
          with open(os.path.join(folder, name), 'wb') as f:
            f.write(b'damaged')
    self.assertEqual(self.launch(workdir).wait(timeout=600), 0)
    log = self.log_text(workdir)
    self.assertIn(f'checkpoint at step {newest} is unreadable', log)
    self.assertIn(f'resumed from step {previous}', log)
    self.assertEqual(self.losses(workdir), self.losses(self.reference))  # redone steps match too


if __name__ == '__main__':
  absltest.main()
