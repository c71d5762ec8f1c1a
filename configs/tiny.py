"""The unit-test model on a slice of the standard library: a smoke run in seconds."""

from configs.common import base_config


def get_config():
  config = base_config('tiny', steps=20, batch_size=4, seq_len=32, peak_lr=3e-3, warmup=4 / 20)
  config.data.vocab_size = 512  # also the model's vocabulary
  config.data.max_documents = 40
  config.data.val_fraction = 0.1
  config.log_every = 5
  config.eval_every = 10
  config.eval_batches = 2
  config.checkpoint_every = 5
  config.sample_tokens = 16
  config.mesh.data = 1  # one device unless overridden (the tests' processes have 8)
  return config
