"""A training run's config (configs/*.py after the command line's overrides): checked, then read as the
model's architecture, its Runtime and the resolved schedules.

Every check here runs before the trainer creates a file, so a typo in an override costs no work and leaves
no trace: the error names the field and the values it takes.
"""

from __future__ import annotations

import dataclasses
import os
import typing

from ml_collections import config_dict

from deepseek_jax import hf, run_dir, schedules
from deepseek_jax.config import PRESETS, ModelConfig, Runtime

# Fields that must be positive integers (sizes, counts and periods), and those that may also be 0.
_POSITIVE = ('steps', 'batch_size', 'seq_len', 'checkpoint_every', 'eval_every', 'log_every', 'eval_batches',
             'eval_batch_size', 'keep_checkpoints', 'max_nonfinite_streak', 'sample_tokens')
_NON_NEGATIVE = ('microbatch_size',)


def model_overrides() -> config_dict.ConfigDict:
  """A placeholder for every ModelConfig field (None: the preset's value), so that any architecture field can
  be overridden from the command line: --config.model_overrides.n_layers=8."""
  hints = typing.get_type_hints(ModelConfig)
  kind = lambda hint: next(t for t in (bool, int, float, str) if t is hint or t in typing.get_args(hint))
  return config_dict.ConfigDict({f.name: config_dict.placeholder(kind(hints[f.name]))
                                 for f in dataclasses.fields(ModelConfig)})


def validate(config) -> None:
  """Raises ValueError naming the first field of `config` that no run can use."""
  _preset(config)
  for name in _POSITIVE + _NON_NEGATIVE:
    value = config[name]
    least = 1 if name in _POSITIVE else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f'config.{name}={value!r} must be an integer >= {least}')
  known = {f.name for f in dataclasses.fields(Runtime)}
  unknown = sorted(set(config.get('runtime', {})) - known)
  if unknown:
    raise ValueError(f'config.runtime.{unknown[0]} is not a Runtime field; the fields are {sorted(known)}')
  for name in ('balance_alpha', 'max_update_ratio'):
    if not config[name] >= 0:
      raise ValueError(f'config.{name}={config[name]} must be >= 0')


def model_config(config) -> ModelConfig:
  """The run's architecture: the preset with config.model_overrides, and the vocabulary of the tokenizer the
  run trains (data.vocab_size) unless the data is pre-tokenized (then the preset's, or an override). With
  config.init_from, the architecture and vocabulary are the checkpoint's (overrides may change fields that
  keep every tensor's shape, such as max_seq_len; one that does not fails the load, naming the tensor)."""
  preset = _preset(config)
  overrides = {key: value for key, value in dict(config.get('model_overrides', {})).items() if value is not None}
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  if set(overrides) - fields:
    raise ValueError(f'config.model_overrides.{sorted(set(overrides) - fields)[0]} is not a ModelConfig field')
  if config.get('init_from'):
    source = init_source(config.init_from)[1]
    if config.data.source != 'tokens' and not config.data.tokenizer_path:
      raise ValueError(f'config.init_from={config.init_from!r}: the model reads the ids of its own tokenizer; set '
                       'config.data.tokenizer_path to it (a Hugging Face directory\'s tokenizer.json, or a run\'s '
                       'data/tokenizer.json) so the corpus is encoded with it')
    return source.replace(**overrides)
  if config.data.source != 'tokens':
    if 'vocab_size' in overrides and overrides['vocab_size'] != config.data.vocab_size:
      raise ValueError(f'model_overrides.vocab_size={overrides["vocab_size"]} differs from data.vocab_size='
                       f'{config.data.vocab_size}: the vocabulary is the tokenizer\'s the run trains; set '
                       'data.vocab_size only')
    overrides['vocab_size'] = config.data.vocab_size
  return preset.replace(**overrides)


def init_source(path: str) -> tuple[str, ModelConfig]:
  """('hf' | 'run', its architecture) of config.init_from: an official-format Hugging Face directory or a
  training run directory."""
  if os.path.isfile(os.path.join(path, 'config.json')):
    return 'hf', hf.read_config(path)[0]
  if os.path.isfile(os.path.join(path, run_dir.MODEL_FILE)):
    return 'run', run_dir.model_config(path)
  raise FileNotFoundError(f'config.init_from={path!r} is neither a Hugging Face model directory (config.json) '
                          f'nor a training run directory ({run_dir.MODEL_FILE})')


def _preset(config) -> ModelConfig:
  if config.model not in PRESETS:
    raise ValueError(f'config.model={config.model!r} is not a model preset; choose one of {sorted(PRESETS)}')
  return PRESETS[config.model]


def runtime(config) -> Runtime:
  """How the run executes the model: config.runtime's fields (dtypes, remat, FP8 recipe, kernels, ...)."""
  return Runtime(**dict(config.get('runtime', {})))


def batch_ramp(config) -> dict | None:
  """config.batch_ramp in schedules.batch_size's terms, or None without a ramp."""
  ramp = config.get('batch_ramp')
  if not ramp:
    return None
  return dict(start=ramp.start, end=config.batch_size, ramp_tokens=ramp.tokens, multiple=ramp.multiple)


def schedule(config) -> schedules.Resolved:
  """config.lr / gamma / mtp_lambda (fractions of the run) in tokens of the run config.steps makes."""
  total = schedules.run_tokens(config.steps, config.seq_len, config.batch_size, batch_ramp(config))
  return schedules.resolve(config.lr, config.gamma, config.mtp_lambda, total)
