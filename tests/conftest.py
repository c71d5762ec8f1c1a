"""Test session setup: 8 CPU devices (real meshes, shard_map and collectives), offline Hugging Face."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # absltest's create_tempdir reads --test_tmpdir; pytest never parses absl flags
