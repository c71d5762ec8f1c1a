"""The unit-test model, for smoke runs of the launchers."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = 'tiny'
  config.seed = 0
  config.sample_tokens = 16
  return config
