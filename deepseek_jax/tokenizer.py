"""Text <-> token ids for decoding: a training run's byte-level BPE, or a Hugging Face directory's
tokenizer.json (DeepSeek's byte-level BPE) with the chat template and special tokens of its
tokenizer_config.json.
"""

from __future__ import annotations

import json
import os

from deepseek_jax import data


class TextCodec:
  """encode(prompt) -> ids (through the chat template when there is one), decode(ids) -> text, stop ids."""

  def __init__(self, tokenizer, chat_template: str | None = None, bos_token: str | None = None,
               eos_token: str | None = None, add_bos: bool = False):
    self.tokenizer = tokenizer
    self.chat_template, self.bos_token, self.eos_token, self.add_bos = chat_template, bos_token, eos_token, add_bos
    eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
    self.stop_ids = [eos_id] if eos_id is not None else []

  def encode(self, prompt: str) -> list[int]:
    if self.chat_template:
      text = _render(self.chat_template, messages=[{'role': 'user', 'content': prompt}], add_generation_prompt=True,
                     bos_token=self.bos_token or '', eos_token=self.eos_token or '')
      return self.tokenizer.encode(text, add_special_tokens=False).ids
    ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
    bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
    return ([bos_id] if self.add_bos and bos_id is not None else []) + ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _render(template: str, **context) -> str:
  """A chat template rendered the way transformers' apply_chat_template does: a sandboxed Jinja environment
  with trim_blocks, lstrip_blocks, loop controls and raise_exception."""
  import jinja2.ext
  import jinja2.sandbox

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.globals['raise_exception'] = raise_exception
  return env.from_string(template).render(**context)


def run_codec(workdir: str) -> TextCodec:
  """The BPE a training run trained and saved (WORKDIR/data/tokenizer.json); EOS stops generation."""
  path = os.path.join(workdir, 'data', 'tokenizer.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: not a training run directory, or a token-file run')
  return file_codec(path)


def hf_codec(hf_dir: str) -> TextCodec:
  """tokenizer.json of a Hugging Face directory, with tokenizer_config.json's chat template and BOS / EOS."""
  path = os.path.join(hf_dir, 'tokenizer.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: the directory ships no tokenizer')
  return file_codec(path)


def file_codec(path: str) -> TextCodec:
  """A tokenizer.json with the chat template and BOS / EOS of the tokenizer_config.json beside it (a Hugging
  Face directory); without one, a run's BPE, whose EOS is data.EOS."""
  config_path = os.path.join(os.path.dirname(path), 'tokenizer_config.json')
  if not os.path.exists(config_path):
    return TextCodec(data.load_tokenizer(path), eos_token=data.EOS)
  with open(config_path) as f:
    config = json.load(f)
  token = lambda key: config[key]['content'] if isinstance(config.get(key), dict) else config.get(key)
  return TextCodec(data.load_tokenizer(path), config.get('chat_template'), token('bos_token'), token('eos_token'),
                   bool(config.get('add_bos_token', False)))
