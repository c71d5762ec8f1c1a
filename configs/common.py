"""Defaults shared by every experiment config: the DeepSeek-V3 recipe (paper §4.2) as fractions of the run.

Schedule boundaries (config.lr, config.gamma, config.mtp_lambda) are fractions of the run's tokens, turned into
tokens when the run starts (schedules.resolve), after the command line's overrides: --config.steps=1000
stretches the whole recipe over the longer run.
"""

import dataclasses

import ml_collections

from deepseek_jax import run_config, schedules
from deepseek_jax.config import Runtime

NEVER = 1e30  # a schedule stage that never ends (a fraction far past the run's end)


def base_config(model: str, steps: int, batch_size: int, seq_len: int, peak_lr: float,
                warmup: float) -> ml_collections.ConfigDict:
  """warmup: the LR warmup's length as a fraction of the run."""
  config = ml_collections.ConfigDict()
  config.model = model  # a key of deepseek_jax.config.PRESETS
  # Architecture changes: any ModelConfig field, e.g. --config.model_overrides.n_layers=8 (None: the preset's).
  # The vocabulary is data.vocab_size's.
  config.model_overrides = run_config.model_overrides()
  # How to run the model (deepseek_jax.config.Runtime), e.g. --config.runtime.dtype=bfloat16,
  # --config.runtime.quant=fp8 (DeepSeek's FP8 recipe on every projection), --config.runtime.remat=True.
  config.runtime = ml_collections.ConfigDict(dataclasses.asdict(Runtime()))
  config.seed = 0
  # Start from pretrained weights instead of a random init: an official-format Hugging Face directory (bf16
  # or FP8 files, loaded as fp32 master weights, router biases from e_score_correction_bias) or a training
  # run's newest checkpoint (weights only). The architecture is the checkpoint's; the corpus must be encoded
  # with its tokenizer (data.tokenizer_path). Only a fresh run reads it; a resumed run continues its own.
  config.init_from = ''
  config.steps = steps
  config.batch_size = batch_size  # sequences per step (the final size when batch_ramp is set)
  config.batch_ramp = ml_collections.ConfigDict()  # optional: start, tokens, multiple
  config.microbatch_size = 0  # 0: the whole batch at once; else gradients accumulate over microbatches
  # Device mesh (deepseek_jax/sharding.py): -1 fills the devices. Batches split over data x expert.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1, pipeline=1))
  # A weight above sharding.REPLICATED_LIMIT_BYTES that the mesh cannot split is an error; True: a warning.
  config.allow_replicated = False
  # With mesh.pipeline > 1 the microbatches run through a pipeline schedule: '1f1b', 'dualpipev' (2 chunks
  # per stage in a V; needs 2 x pipeline microbatches) or 'gpipe' (deepseek_jax/pipeline_schedules.py).
  config.pipeline_schedule = '1f1b'
  config.seq_len = seq_len
  config.lr = schedules.paper_lr(peak_lr, warmup)
  config.optimizer = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
  # gamma 0.001 for 14.3T of 14.8T tokens, then 0; MTP lambda 0.3 for 10T, then 0.1; alpha 1e-4.
  config.gamma = [(14.3 / 14.8, 0.001), (NEVER, 0.0)]
  config.mtp_lambda = [(10 / 14.8, 0.3), (NEVER, 0.1)]
  config.balance_alpha = 1e-4
  config.max_nonfinite_streak = 5  # consecutive skipped steps (train_step.py) before the run stops
  config.max_update_ratio = 1.0  # skip a step that moves the weights by more than their norm (0: no limit)
  config.log_every = 10
  config.eval_every = 100
  config.eval_batches = 8
  config.eval_batch_size = batch_size
  config.checkpoint_every = 100
  config.keep_checkpoints = 3
  config.data = ml_collections.ConfigDict(dict(
      source='stdlib',  # stdlib | shakespeare | files | tokens
      files='',  # comma-separated globs for source='files'
      max_documents=0,  # 0: all
      vocab_size=4096,
      val_fraction=0.02,
      tokens_path='',  # source='tokens': a .npy, or raw ids of tokens_dtype
      tokens_dtype='uint16',
      tokenizer_path='',  # source='tokens': optional tokenizer.json for decoding samples
  ))
  config.sample_prompt = 'def '
  config.sample_tokens = 64
  return config


def pod_defaults(config: ml_collections.ConfigDict) -> None:
  """Accelerator-scale runs: fp32 master weights with bf16 activations, rematerialised blocks, a
  pre-tokenized corpus (uint32 ids: vocabularies past 65536), evaluation and checkpoints every few hundred
  steps, a log line per step."""
  config.runtime.update(param_dtype='float32', dtype='bfloat16', remat=True)
  config.microbatch_size = 0  # set per device count and memory, e.g. 64 sequences per accumulation step
  config.eval_every = 1000
  config.eval_batch_size = 64
  config.checkpoint_every = 500
  config.log_every = 1
  config.data.source = 'tokens'  # set data.tokens_path (and data.tokenizer_path for decoded samples)
  config.data.tokens_dtype = 'uint32'
  config.data.val_fraction = 0.0005
