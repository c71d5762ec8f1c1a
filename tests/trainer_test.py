"""The training launcher end to end, in subprocesses: kill -9 and resume, SIGTERM, a damaged checkpoint, reruns
that must not touch a run, a diverging run (a second trainer on one directory: run_dir_test.LockTest).

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

from tests.run_dir_test import tree_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


class LauncherTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = absltest.get_default_test_tmpdir()
    os.makedirs(cls.root, exist_ok=True)
    cls.env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}  # conftest's XLA flags and compilation cache
    cls.reference = cls.fresh('uninterrupted')
    result = cls.launch(cls.reference).wait(timeout=600)
    assert result == 0, f'uninterrupted run failed with {result}'

  @classmethod
  def fresh(cls, name):
    """An empty run directory, and an empty log for it (logs are appended to across a test's launches)."""
    workdir = os.path.join(cls.root, name)
    for old in [workdir] + [os.path.join(cls.root, n) for n in os.listdir(cls.root) if n.startswith(name + '.replaced-')]:
      shutil.rmtree(old, ignore_errors=True)  # also the runs an earlier session's --overwrite moved aside
    if os.path.exists(workdir + '.log'):
      os.remove(workdir + '.log')
    return workdir

  @classmethod
  def launch(cls, workdir, *overrides):
    command = [sys.executable, '-m', 'launch.train', '--config=configs/tiny.py', f'--workdir={workdir}',
               f'--config.steps={STEPS}', '--config.checkpoint_every=5', *overrides]
    log = open(workdir + '.log', 'a')
    return subprocess.Popen(command, cwd=REPO, env=cls.env, stdout=log, stderr=subprocess.STDOUT)

  def run_to_end(self, workdir, *overrides, expect=1):
    """A launch that must end on its own (a refusal ends before any training): its stderr."""
    command = [sys.executable, '-m', 'launch.train', '--config=configs/tiny.py', f'--workdir={workdir}',
               f'--config.steps={STEPS}', '--config.checkpoint_every=5', *overrides]
    done = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=600)
    self.assertEqual(done.returncode, expect, done.stderr[-3000:])
    return done.stderr

  def copy_of_reference(self, name):
    workdir = self.fresh(name)
    shutil.copytree(self.reference, workdir)
    return workdir

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

  def test_params_only_restore_onto_a_mesh_decodes_the_same_tokens(self):
    import jax
    import numpy as np
    from flax import nnx
    from deepseek_jax import sharding
    from deepseek_jax.generate import generate
    from deepseek_jax.trainer import restore_model
    cfg, model, _ = restore_model(self.reference)
    mesh = sharding.make_mesh(data=2, expert=4)
    _, on_mesh, step = restore_model(self.reference, mesh=mesh)
    self.assertEqual(step, STEPS)
    weights = nnx.state(on_mesh)
    want = sharding.state_shardings(weights, mesh)
    for (path, leaf), expected in zip(jax.tree_util.tree_flatten_with_path(weights)[0], jax.tree.leaves(want)):
      self.assertEqual(leaf.sharding, expected, path)  # each parameter restored straight into its sharding
    w1 = on_mesh.moe_layers.ffn.experts.w1[...]
    self.assertEqual(w1.addressable_shards[0].data.nbytes, w1.nbytes // 8)  # experts over 4, FSDP over 2
    np.testing.assert_array_equal(w1, model.moe_layers.ffn.experts.w1[...])
    prompts = [[5, 9, 33, 7, 120], [100, 2], [7, 8]]
    self.assertEqual(generate(on_mesh, prompts, 12, mesh=mesh).tokens, generate(model, prompts, 12).tokens)

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
    from deepseek_jax.trainer import restore_model
    with self.assertLogs(level='WARNING') as logs:  # a reader (decode) says what it took and why
      self.assertEqual(restore_model(workdir)[2], previous)
    self.assertRegex('\n'.join(logs.output), f'restored step {previous} of {workdir}: the newest readable checkpoint; '
                     f'skipped step {newest}: ')
    self.assertIn(str(newest), os.listdir(checkpoints))  # ... and moves nothing: a trainer may own the directory
    self.assertEqual(self.launch(workdir).wait(timeout=600), 0)
    log = self.log_text(workdir)
    self.assertIn(f'checkpoint at step {newest} is unreadable', log)
    self.assertIn(f'resumed from step {previous}', log)
    self.assertEqual(self.losses(workdir), self.losses(self.reference))  # redone steps match too
    # Healed: the damaged step was moved aside (kept) and saved again, so the next reader gets the final state.
    self.assertLen([n for n in os.listdir(os.path.join(workdir, 'damaged_checkpoints')) if
                    n.startswith(f'{newest}.')], 1)
    self.assertIn(str(newest), os.listdir(checkpoints))
    self.assertEqual(restore_model(workdir)[2], newest)

  def test_incompatible_rerun_touches_nothing(self):
    workdir = self.copy_of_reference('incompatible')
    before = tree_bytes(workdir)
    for overrides, named in ((['--config.data.vocab_size=1024'], ['model.vocab_size: the run has 512, asked 1024',
                                                                  'data.vocab_size: the run has 512, asked 1024']),
                             (['--config.data.max_documents=30'], ['data.max_documents: the run has 40, asked 30'])):
      stderr = self.run_to_end(workdir, '--config.steps=25', *overrides)
      self.assertIn(f'{workdir} holds a different run', stderr)
      for line in named:
        self.assertIn(line, stderr)
      self.assertEqual(tree_bytes(workdir), before)  # checkpoints, metrics, model.json, tokenizer: untouched

  def test_no_readable_checkpoint_refuses_until_overwrite_moves_the_run_aside(self):
    workdir = self.copy_of_reference('unreadable')
    checkpoints = os.path.join(workdir, 'checkpoints')
    for step in os.listdir(checkpoints):
      for name in os.listdir(os.path.join(checkpoints, step)):
        shutil.rmtree(os.path.join(checkpoints, step, name), ignore_errors=True)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
      metrics = f.read()
    for _ in range(2):  # refused, and refused again: the moved-aside checkpoints still count
      stderr = self.run_to_end(workdir)
      self.assertIn(f'no checkpoint of the run in {workdir} is readable', stderr)
      self.assertIn('--overwrite', stderr)
      with open(os.path.join(workdir, 'metrics.jsonl'), 'rb') as f:
        self.assertEqual(f.read(), metrics)
    self.run_to_end(workdir, '--overwrite', '--config.steps=2', expect=0)
    aside = [n for n in os.listdir(self.root) if n.startswith('unreadable.replaced-')]
    self.assertLen(aside, 1)
    with open(os.path.join(self.root, aside[0], 'metrics.jsonl'), 'rb') as f:
      self.assertEqual(f.read(), metrics)  # the old run, kept whole
    fresh = self.losses(workdir)  # a new run of 2 steps from the same seed: its first loss is the reference's
    self.assertLen(fresh, 2)
    self.assertEqual(fresh[0], self.losses(self.reference)[0])

  def test_config_errors_end_before_any_file(self):
    # (Every other config check runs in-process in run_dir_test; here the launcher's one-line reports.)
    for overrides, message in ((['--config.stepz=3'], 'FATAL Flags parsing error: --config override: \'stepz\' Did you '
                                                      'mean "steps" instead of "stepz"?'),
                               (['--config.batch_size=0'], 'error: config.batch_size=0 must be an integer >= 1')):
      workdir = self.fresh('refused')
      self.assertIn(message, self.run_to_end(workdir, *overrides))
      self.assertFalse(os.path.exists(workdir))

  def test_decode_fits_the_default_length_to_the_model(self):
    done = subprocess.run([sys.executable, '-m', 'launch.decode', f'--workdir={self.reference}', '--prompt=def '],
                          cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300)
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    room = int(re.search(r'has room for (\d+) after the prompt: generating \1', done.stderr).group(1))
    self.assertIn(f'restored step {STEPS} of {self.reference}', done.stderr)
    generated = int(re.search(r'\n(\d+) tokens in \d+ decode steps', done.stdout).group(1))
    self.assertBetween(generated, 1, room)  # fewer when the model emits its end-of-text token

  def test_a_diverging_run_never_saves_its_divergence(self):
    workdir = self.fresh('diverging')
    stderr = self.run_to_end(workdir, '--config.lr.peak=1e30', '--config.lr.warmup=0', '--config.max_nonfinite_streak=3',
                      '--config.checkpoint_every=2')
    self.assertIn('3 consecutive steps skipped', stderr)
    from deepseek_jax.checkpoint import Checkpointer
    from deepseek_jax.trainer import restore_model
    steps = Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False).steps()
    self.assertTrue(steps)
    _, model, _ = restore_model(workdir)
    from flax import nnx
    # Init weights are N(0, 0.006) and norm scales 1: one applied 1e30-sized update would show by orders.
    largest = max(float(abs(v[...]).max()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    self.assertLess(largest, 10.0)


if __name__ == '__main__':
  absltest.main()
