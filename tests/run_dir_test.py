"""Nothing of a run is lost: the workdir lock, the compatibility check, damaged vs incompatible checkpoints, the
config checks that run before any file is written, and the metrics file a crash cut short.

(The launcher end to end, with real runs, is trainer_test.py.)
"""

import json
import os
import socket
import subprocess
import sys
import time
from unittest import mock

import jax.numpy as jnp
import numpy as np
from absl import flags
from absl.testing import absltest, parameterized
from ml_collections import config_flags

from configs import tiny
from deepseek_jax import run_dir
from deepseek_jax.checkpoint import Checkpointer, IncompatibleCheckpointError
from deepseek_jax.config import PRESETS
from deepseek_jax.metrics import MetricsWriter, read_metrics
from deepseek_jax.run_config import model_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = {'w': jnp.arange(12.0).reshape(3, 4), 'n': {'count': jnp.int32(7)}}


def tree_bytes(path):
  """{relative path: bytes} of every file under `path`."""
  out = {}
  for folder, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(folder, name), 'rb') as f:
        out[os.path.relpath(os.path.join(folder, name), path)] = f.read()
  return out


class LockTest(absltest.TestCase):

  def test_second_writer_is_refused_and_a_dead_holder_does_not_block(self):
    workdir = self.create_tempdir().full_path
    holder = subprocess.Popen(
        [sys.executable, '-c', 'import sys, time; from deepseek_jax.run_dir import RunLock\n'
         'with RunLock(sys.argv[1]):\n  print("held", flush=True); time.sleep(120)', workdir],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
      self.assertEqual(holder.stdout.readline().strip(), 'held')
      start = time.time()
      with self.assertRaisesRegex(run_dir.RunDirError,
                                  f'{workdir} is in use by another trainer \\(pid {holder.pid} on host '
                                  f'{socket.gethostname()}'):
        run_dir.RunLock(workdir).__enter__()
      self.assertLess(time.time() - start, 5)  # at once, not after a timeout
      # A second trainer, the launcher end to end: exit 1 at once, naming the holder, writing nothing.
      done = subprocess.run([sys.executable, '-m', 'launch.train', '--config=configs/tiny.py', f'--workdir={workdir}'],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
      self.assertEqual(done.returncode, 1, done.stderr[-2000:])
      self.assertIn(f'error: {workdir} is in use by another trainer (pid {holder.pid}', done.stderr)
      self.assertEqual(os.listdir(workdir), [run_dir.LOCK_FILE])
    finally:
      holder.kill()
      holder.wait(timeout=30)
    # kill -9 left the lock file with the dead holder's pid: the kernel dropped the lock itself.
    self.assertIn(str(holder.pid), open(os.path.join(workdir, run_dir.LOCK_FILE)).read())
    with run_dir.RunLock(workdir):
      self.assertIn(str(os.getpid()), open(os.path.join(workdir, run_dir.LOCK_FILE)).read())


class CompatibilityTest(absltest.TestCase):

  def test_every_differing_field_is_named(self):
    workdir = self.create_tempdir().full_path
    cfg = PRESETS['tiny'].replace(vocab_size=512)
    data = {'source': 'stdlib', 'files': '', 'max_documents': 40, 'vocab_size': 512, 'val_fraction': 0.1}
    run_dir.record(workdir, cfg, {'data': data})
    before = tree_bytes(workdir)
    run_dir.check_compatible(workdir, cfg, {'data': data})  # the same run: resumes
    with self.assertRaises(run_dir.RunDirError) as raised:
      run_dir.check_compatible(workdir, cfg.replace(vocab_size=1024, n_layers=4),
                               {'data': {**data, 'vocab_size': 1024, 'max_documents': 30}})
    message = str(raised.exception)
    for line in ('model.vocab_size: the run has 512, asked 1024', 'model.n_layers: the run has 3, asked 4',
                 'data.vocab_size: the run has 512, asked 1024', 'data.max_documents: the run has 40, asked 30'):
      self.assertIn(line, message)
    self.assertIn('--overwrite', message)
    self.assertEqual(tree_bytes(workdir), before)

  def test_a_run_from_before_run_json_is_checked_by_its_corpus_fingerprint(self):
    workdir = self.create_tempdir().full_path
    os.makedirs(os.path.join(workdir, 'data'))
    with open(os.path.join(workdir, 'data', 'meta.json'), 'w') as f:
      json.dump({'fingerprint': 'abc'}, f)
    run_dir.check_compatible(workdir, PRESETS['tiny'], {'data': {}}, 'abc')
    with self.assertRaisesRegex(run_dir.RunDirError, 'fingerprint differs'):
      run_dir.check_compatible(workdir, PRESETS['tiny'], {'data': {}}, 'abd')

  def test_move_aside_keeps_everything_but_the_lock(self):
    workdir = self.create_tempdir().full_path
    for name in ('model.json', 'metrics.jsonl'):
      with open(os.path.join(workdir, name), 'w') as f:
        f.write(name)
    os.makedirs(os.path.join(workdir, 'checkpoints', '4'))
    before = tree_bytes(workdir)
    with run_dir.RunLock(workdir):
      aside = run_dir.move_aside(workdir)
    self.assertEqual(tree_bytes(aside), before)
    self.assertTrue(os.path.isdir(os.path.join(aside, 'checkpoints', '4')))
    self.assertEqual(os.listdir(workdir), [run_dir.LOCK_FILE])
    self.assertTrue(os.path.basename(aside).startswith(os.path.basename(workdir) + '.replaced-'))


def _damage_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'meta', 'metadata'))


def _truncate_files(step_dir):
  for folder, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty(step_dir):
  for name in os.listdir(step_dir):
    path = os.path.join(step_dir, name)
    if os.path.isdir(path):
      import shutil
      shutil.rmtree(path)
    else:
      os.remove(path)


class CheckpointTest(parameterized.TestCase):

  def saved(self, steps=(4, 8, 12)):
    directory = os.path.join(self.create_tempdir().full_path, 'checkpoints')
    checkpoints = Checkpointer(directory, async_save=False)
    for step in steps:
      checkpoints.save(step, jax_tree(step), {'tokens_seen': step * 10, 'data': {}})
    checkpoints.wait()
    return directory, checkpoints

  @parameterized.named_parameters(('metadata_removed', _damage_metadata), ('files_truncated', _truncate_files),
                                  ('emptied', _empty))
  def test_damaged_newest_is_moved_aside_and_saved_again(self, damage):
    directory, checkpoints = self.saved()
    damage(os.path.join(directory, '12'))
    damaged = os.path.join(os.path.dirname(directory), 'damaged_checkpoints')
    restored = checkpoints.restore(STATE, damaged_dir=damaged)
    self.assertEqual(restored.step, 8)
    np.testing.assert_array_equal(restored.state['w'], jax_tree(8)['w'])
    self.assertEqual(restored.meta['tokens_seen'], 80)
    self.assertLen(restored.skipped, 1)
    self.assertTrue(restored.skipped[0].startswith('step 12: '))
    self.assertEqual(checkpoints.steps(), [4, 8])  # no longer listed ...
    self.assertLen([n for n in os.listdir(damaged) if n.startswith('12.')], 1)  # ... but kept
    checkpoints.save(12, jax_tree(12), {'tokens_seen': 120, 'data': {}})  # the step is saved again
    checkpoints.wait()
    self.assertEqual(checkpoints.restore(STATE, damaged_dir=damaged).step, 12)
    checkpoints.close()

  def test_a_reader_skips_damage_without_moving_it(self):
    directory, checkpoints = self.saved()
    _truncate_files(os.path.join(directory, '12'))
    restored = checkpoints.restore(STATE)
    self.assertEqual((restored.step, checkpoints.steps()), (8, [4, 8, 12]))
    checkpoints.close()

  def test_every_checkpoint_damaged_restores_nothing(self):
    directory, checkpoints = self.saved((4, 8))
    for step in (4, 8):
      _empty(os.path.join(directory, str(step)))
    self.assertIsNone(checkpoints.restore(STATE, damaged_dir=os.path.join(directory, '..', 'damaged')))
    checkpoints.close()

  def test_incompatible_state_raises_and_moves_nothing(self):
    directory, checkpoints = self.saved()
    before = tree_bytes(directory)
    other = {'w': jnp.zeros((3, 5)), 'n': {'count': jnp.int32(0)}, 'extra': jnp.zeros(2)}
    with self.assertRaisesRegex(IncompatibleCheckpointError,
                                r'holds another state than this run builds: extra is missing; '
                                r'w has shape \(3, 4\), this run \(3, 5\)'):
      checkpoints.restore(other, damaged_dir=os.path.join(directory, '..', 'damaged'))
    self.assertEqual(tree_bytes(directory), before)
    checkpoints.close()


def jax_tree(step):
  return {'w': jnp.arange(12.0).reshape(3, 4) + step, 'n': {'count': jnp.int32(step)}}


class ConfigCheckTest(parameterized.TestCase):

  def parse(self, *overrides):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=values)
    argv = ['train', f'--config={os.path.join(REPO, "configs", "tiny.py")}', *overrides]
    with mock.patch.object(sys, 'argv', argv):  # config_flags reads its overrides from sys.argv
      values(argv)
    return values.config

  def test_any_model_field_can_be_overridden(self):
    config = self.parse('--config.model_overrides.n_layers=4', '--config.model_overrides.route_scale=2.5',
                        '--config.model_overrides.norm_topk_prob=false', '--config.model_overrides.score_func=softmax')
    cfg = model_config(config)
    self.assertEqual((cfg.n_layers, cfg.route_scale, cfg.norm_topk_prob, cfg.score_func), (4, 2.5, False, 'softmax'))
    self.assertEqual(cfg.dim, PRESETS['tiny'].dim)  # unset fields keep the preset's
    self.assertEqual(model_config(self.parse()), PRESETS['tiny'].replace(vocab_size=512))

  def test_the_vocabulary_is_the_tokenizers(self):
    config = self.parse('--config.model_overrides.vocab_size=1024')
    with self.assertRaisesRegex(ValueError, r'model_overrides.vocab_size=1024 differs from data.vocab_size=512'):
      model_config(config)

  def test_unknown_key_names_the_key(self):
    with self.assertRaisesRegex(AttributeError, 'stepz'):
      self.parse('--config.stepz=3')

  @parameterized.parameters(('steps', -1), ('steps', 0), ('batch_size', 0), ('checkpoint_every', 0),
                            ('eval_every', 0), ('seq_len', 0), ('microbatch_size', -2), ('max_update_ratio', -1.0))
  def test_bad_sizes_are_refused_by_name(self, field, value):
    config = tiny.get_config()
    config[field] = value
    with self.assertRaisesRegex(ValueError, f'config\\.{field}={value}'):
      validate(config)

  def test_unknown_model_preset(self):
    config = tiny.get_config()
    config.model = 'nosuch'
    with self.assertRaisesRegex(ValueError, r"config.model='nosuch' is not a model preset; choose one of"):
      validate(config)

  def test_refused_config_writes_nothing(self):
    from deepseek_jax.trainer import train
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    config = tiny.get_config()
    config.checkpoint_every = 0
    with self.assertRaisesRegex(ValueError, 'checkpoint_every'):
      train(config, workdir)
    self.assertFalse(os.path.exists(workdir))


class MetricsFileTest(absltest.TestCase):

  def test_a_cut_last_line_is_dropped_and_a_damaged_middle_line_named(self):
    workdir = self.create_tempdir().full_path
    path = os.path.join(workdir, 'metrics.jsonl')
    with open(path, 'w') as f:
      f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    self.assertEqual([r['step'] for r in read_metrics(path)], [1, 2])
    writer = MetricsWriter(workdir, resume_step=2)  # a resume rewrites the file without the cut line
    writer.write(3, {'loss': 1.0})
    writer.close()
    self.assertEqual([r['step'] for r in read_metrics(path)], [1, 2, 3])
    with open(path, 'w') as f:
      f.write('{"step": 1}\n{"st\n{"step": 3}\n')
    with self.assertRaisesRegex(ValueError, f'{path}, line 2: not a JSON record'):
      read_metrics(path)


if __name__ == '__main__':
  absltest.main()
