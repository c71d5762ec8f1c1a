"""Decoding tokenizers: an HF directory's tokenizer.json and chat template against transformers, and the
decoding launcher on an official-format directory."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile

import pytest
from absl.testing import absltest

from deepseek_jax import data
from deepseek_jax.hf import save_hf
from deepseek_jax.config import PRESETS
from deepseek_jax.tokenizer import hf_codec, run_codec
from tests.helpers import random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS, USER, ASSISTANT = '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>', '<｜User｜>', '<｜Assistant｜>'
# DeepSeek-V3's template shortened to user / assistant turns, laid out over lines: without transformers'
# trim_blocks / lstrip_blocks the rendering would gain newlines and indentation.
TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}\n"
    "  {% if message['role'] == 'user' %}\n"
    "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}\n"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")
TEXT = ['def parse(line):\n    return line.split(",")\n', 'Hello, world! Ünïcödé and emoji 🙂 too.'] * 20


def hf_directory(path, template=True, vocab_size=300):
  """tokenizer.json (a byte-level BPE with DeepSeek's special tokens) and tokenizer_config.json."""
  tokenizer = data.train_tokenizer(TEXT, vocab_size - 4)
  tokenizer.add_special_tokens([BOS, EOS, USER, ASSISTANT])
  os.makedirs(path, exist_ok=True)
  tokenizer.save(os.path.join(path, 'tokenizer.json'))
  added = lambda token: {'__type': 'AddedToken', 'content': token, 'lstrip': False, 'normalized': True,
                         'rstrip': False, 'single_word': False}  # as DeepSeek-V3's tokenizer_config.json
  config = {'bos_token': added(BOS), 'eos_token': added(EOS), 'add_bos_token': True,
            'tokenizer_class': 'PreTrainedTokenizerFast'}
  if template:
    config['chat_template'] = TEMPLATE
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  return tokenizer


class HFCodecTest(absltest.TestCase):

  def test_chat_template_matches_transformers(self):
    try:
      import transformers
    except ImportError:
      self.skipTest('SKIPPED LOUDLY: transformers is not installed (pip install -e ".[test]")')
    path = tempfile.mkdtemp()
    hf_directory(path)
    codec = hf_codec(path)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    for prompt in ('def parse(', 'Ünïcödé 🙂\n  indented', ''):
      want = reference.apply_chat_template([{'role': 'user', 'content': prompt}], add_generation_prompt=True,
                                           tokenize=True)
      want = want['input_ids'] if isinstance(want, dict) or hasattr(want, 'keys') else want
      self.assertEqual(codec.encode(prompt), list(want))
    ids = codec.encode('def parse(')
    self.assertEqual(ids[0], codec.tokenizer.token_to_id(BOS))
    self.assertEqual(codec.decode(ids), 'def parse(')  # special tokens skipped
    self.assertEqual(codec.stop_ids, [codec.tokenizer.token_to_id(EOS)])

  def test_without_template_adds_bos_as_configured(self):
    path = tempfile.mkdtemp()
    tokenizer = hf_directory(path, template=False)
    ids = hf_codec(path).encode('Hello')
    self.assertEqual(ids, [tokenizer.token_to_id(BOS)] + tokenizer.encode('Hello', add_special_tokens=False).ids)

  def test_missing_tokenizer_errors_name_the_file(self):
    with self.assertRaisesRegex(FileNotFoundError, 'tokenizer.json'):
      hf_codec(tempfile.mkdtemp())
    with self.assertRaisesRegex(FileNotFoundError, 'not a training run directory'):
      run_codec(tempfile.mkdtemp())


class HFDecodeLauncherTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.path = tempfile.mkdtemp()
    tokenizer = hf_directory(cls.path)
    cfg = PRESETS['tiny'].replace(vocab_size=tokenizer.get_vocab_size())
    save_hf(cfg, random_model(cfg, seed=2), cls.path)

  def decode(self, *flags):
    done = subprocess.run([sys.executable, '-m', 'launch.decode', f'--hf_dir={self.path}', '--max_new_tokens=12',
                           '--dtype=float32', *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    return done.stdout

  def test_decodes_an_official_format_directory(self):
    plain, spec = self.decode('--prompt=def '), self.decode('--prompt=def ', '--speculative=mtp')
    # The command: 8 CPU devices, rows over data x expert, each device loading only its weight shards.
    on_mesh = self.decode('--prompt=def ', '--mesh.data=2', '--mesh.expert=4', '--cpu_devices=8', '--temperature=0')
    self.assertRegex(plain, r'\d+ tokens in \d+ decode steps')
    self.assertRegex(spec, r'MTP acceptance: \d+/\d+')
    split = lambda out: re.split(r'\n(?=\d+ tokens in)', out, maxsplit=1)[0]
    self.assertEqual(split(plain), split(spec))
    self.assertEqual(split(on_mesh), split(plain))
    self.assertTrue(split(plain).startswith('def '))

  @pytest.mark.slow  # ~35 s; the default suite runs the one-process mesh command and 2-process training and loading
  def test_two_processes_decode_the_one_process_batch(self):
    prompts = os.path.join(self.path, 'prompts.txt')
    with open(prompts, 'w') as f:
      f.write('def \nclass Tree:\nimport \n')
    flags = (f'--prompt_file={prompts}', '--mesh.data=2', '--mesh.expert=4')
    want = re.split(r'\n(?=\d+ tokens in)', self.decode(*flags, '--cpu_devices=8'), maxsplit=1)[0]
    self.assertEqual(want.count('\n---'), 3)
    with socket.socket() as s:  # a free loopback port
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    # 2 processes x 4 CPU devices over loopback, the multi-host form of the same mesh; process 0 prints.
    command = [sys.executable, '-m', 'launch.decode', f'--hf_dir={self.path}', '--max_new_tokens=12',
               '--dtype=float32', *flags, '--cpu_devices=4', f'--coordinator_address=127.0.0.1:{port}',
               '--num_processes=2']
    processes = [subprocess.Popen(command + [f'--process_id={i}'], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
      outputs = [p.communicate(timeout=300) for p in processes]
    finally:
      for p in processes:
        p.kill()
    for p, (_, err) in zip(processes, outputs):
      self.assertEqual(p.returncode, 0, err[-3000:])
    self.assertIn(want, outputs[0][0])  # (XLA's CPU collectives library prints its own lines to stdout too)
    self.assertNotIn('---', outputs[1][0])

  def test_tokenizer_and_sampling_are_checked_before_the_weights(self):
    path = tempfile.mkdtemp()
    tokens = hf_directory(path, vocab_size=600).get_vocab_size()
    self.assertGreater(tokens, 300)
    save_hf(PRESETS['tiny'].replace(vocab_size=300), random_model(PRESETS['tiny'].replace(vocab_size=300)), path)
    with open(os.path.join(path, 'model.safetensors'), 'wb') as f:
      f.write(b'not weights')  # reading the weights would fail on this first

    def decode(*flags):
      done = subprocess.run([sys.executable, '-m', 'launch.decode', f'--hf_dir={path}', '--prompt=def ', *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
      self.assertEqual(done.returncode, 1, done.stderr[-3000:])
      return done.stderr

    self.assertIn(f'error: the tokenizer has {tokens} tokens but the model vocab_size is 300', decode())
    self.assertIn('error: n_routed_experts=8 does not divide by the mesh\'s expert axis (3 devices)',
                  decode('--mesh.expert=3', '--cpu_devices=3', '--max_new_tokens=4'))
    self.assertIn('error: temperature=nan must be a finite number >= 0', decode('--temperature=nan'))
    os.remove(os.path.join(path, 'tokenizer.json'))
    self.assertIn(f'error: {path}/tokenizer.json does not exist', decode())


if __name__ == '__main__':
  absltest.main()
