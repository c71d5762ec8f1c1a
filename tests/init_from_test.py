"""Fine-tuning from and exporting to the Hugging Face format, with transformers as the oracle (fp32).

HF directory -> --config.init_from (streamed into a 2 x 4 training mesh) -> the first step's loss equals
transformers' loss on the same batch; the run -> launch.export -> load_hf gives the run's logits exactly,
transformers reads the export; a run directory works as init_from too.
"""

import json
import os
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from configs import tiny
from deepseek_jax import data
from deepseek_jax.hf import load_hf
from deepseek_jax.loss import cross_entropy
from deepseek_jax.tokenizer import hf_codec, run_codec
from deepseek_jax.trainer import restore_model, train
from tests.helpers import random_hf_model, require
from tests.tokenizer_test import hf_directory

torch = require('torch')
transformers = require('transformers')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 8, 32


def hf_model_dir(path):
  """A random transformers DeepseekV3 (tests.helpers.random_hf_model) saved with a BPE tokenizer."""
  model = random_hf_model(hf_directory(path).get_vocab_size())
  model.save_pretrained(path)
  return model


def run_config(init_from, tokenizer_path, **mesh):
  config = tiny.get_config()
  config.init_from, config.data.tokenizer_path = init_from, tokenizer_path
  config.steps, config.batch_size, config.seq_len = 1, BATCH, SEQ
  config.eval_batch_size, config.sample_tokens = BATCH, 4
  config.mesh.update(mesh or dict(data=1))
  return config


def first_batch(config, workdir):
  """The token windows of the run's first step (the trainer's data order)."""
  corpus = data.prepare(config.data, os.path.join(workdir, 'data'))
  indices = data.BatchIterator(corpus.train, config.seq_len, config.seed).next_indices(config.batch_size)
  return np.stack([data.window(corpus.train, config.seq_len, i) for i in indices]).astype(np.int64)


def first_ce(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return json.loads(f.readline())['ce']


class InitFromAndExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.hf_dir = tempfile.mkdtemp()
    cls.hf = hf_model_dir(cls.hf_dir)
    cls.workdir = os.path.join(tempfile.mkdtemp(), 'run')
    cls.config = run_config(cls.hf_dir, os.path.join(cls.hf_dir, 'tokenizer.json'), data=2, expert=4)
    cls.result = train(cls.config, cls.workdir)

  def test_first_step_loss_is_transformers_loss(self):
    self.assertEqual(self.result.step, 1)
    tokens = torch.from_numpy(first_batch(self.config, self.workdir))
    with torch.no_grad():
      logits = self.hf(tokens[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    # The step's loss is taken before its update: the HF weights, as fp32 master weights on the mesh.
    self.assertAlmostEqual(first_ce(self.workdir), float(want), delta=2e-5 * float(want))

  def test_the_corpus_is_encoded_with_the_checkpoints_tokenizer(self):
    self.assertEqual(run_codec(self.workdir).tokenizer.to_str(), hf_codec(self.hf_dir).tokenizer.to_str())
    self.assertEqual(run_codec(self.workdir).stop_ids, hf_codec(self.hf_dir).stop_ids)  # its EOS, not the run BPE's

  def test_export_round_trip(self):
    out = os.path.join(tempfile.mkdtemp(), 'export')
    done = subprocess.run([sys.executable, '-m', 'launch.export', f'--workdir={self.workdir}', f'--out={out}',
                           '--dtype=float32', '--mesh.data=2', '--mesh.expert=4', '--cpu_devices=8'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    self.assertIn(f'step 1 of {self.workdir} -> {out}', done.stdout)
    _, trained, _ = restore_model(self.workdir)
    _, exported = load_hf(out)
    tokens = jnp.asarray(first_batch(self.config, self.workdir)[:2, :-1])
    np.testing.assert_array_equal(np.asarray(exported(tokens)), np.asarray(trained(tokens)))  # bit for bit
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
      theirs = hf(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    ours = np.asarray(trained(tokens))
    self.assertLess(np.abs(theirs - ours).max() / np.abs(ours).max(), 1e-5)
    self.assertEqual(hf_codec(out).tokenizer.to_str(), run_codec(self.workdir).tokenizer.to_str())
    again = subprocess.run([sys.executable, '-m', 'launch.export', f'--workdir={self.workdir}', f'--out={out}'],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    self.assertEqual(again.returncode, 1)
    self.assertIn(f'error: --out={out} exists', again.stderr)

  def test_a_run_directory_as_init_from(self):
    workdir = os.path.join(tempfile.mkdtemp(), 'again')
    config = run_config(self.workdir, os.path.join(self.workdir, 'data', 'tokenizer.json'))
    train(config, workdir)
    _, source, _ = restore_model(self.workdir)
    tokens = jnp.asarray(first_batch(config, workdir))
    want = float(cross_entropy(source(tokens[:, :-1]), tokens[:, 1:]))
    self.assertAlmostEqual(first_ce(workdir), want, delta=1e-5 * want)

  def test_errors(self):
    root = tempfile.mkdtemp()
    with self.assertRaisesRegex(FileNotFoundError, 'init_from=.* is neither a Hugging Face model directory'):
      train(run_config(root, ''), os.path.join(root, 'a'))
    with self.assertRaisesRegex(ValueError, 'set config.data.tokenizer_path'):
      train(run_config(self.hf_dir, ''), os.path.join(root, 'b'))
    config = run_config(self.hf_dir, os.path.join(self.hf_dir, 'tokenizer.json'))
    config.model_overrides.n_routed_experts = 16
    with self.assertRaisesRegex(ValueError, 'experts'):
      train(config, os.path.join(root, 'c'))


if __name__ == '__main__':
  absltest.main()
