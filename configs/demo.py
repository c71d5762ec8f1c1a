"""The CPU demo: a few-million-parameter DeepSeek-V3 (MLA, grouped sigmoid MoE, MTP)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = 'demo'  # a key of deepseek_jax.config.PRESETS
  config.seed = 0
  config.sample_tokens = 48
  return config
