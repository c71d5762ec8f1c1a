r"""Train a DeepSeek-V3 model (absl). Rerun the same command to resume from the newest checkpoint.

  python -m launch.train --config=configs/demo.py --workdir=runs/demo [--config.steps=1000 ...]
  python -m launch.train --config=configs/tiny.py --workdir=runs/mesh --cpu_devices=8 \
      --config.mesh.data=2 --config.mesh.expert=4     # a data x expert mesh of 8 CPU devices
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.trainer import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, tokenizer, sample.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'Split the host CPU into this many devices (meshes on a '
                                    'machine without accelerators); 0 keeps the platform default.')


class _QuietLibraries(std_logging.Filter):
  """Orbax narrates every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _CPU_DEVICES.value:
    import jax
    jax.config.update('jax_num_cpu_devices', _CPU_DEVICES.value)  # before the first use of a backend
  logging.info('config:\n%s', _CONFIG.value)
  result = train(_CONFIG.value, _WORKDIR.value)
  if result.preempted:
    print(f'stopped at step {result.step} on request; rerun the same command to resume')
    return
  print(f'step {result.step}: validation loss {result.val_loss:.4f} nats/token')
  print('sample:\n' + result.sample)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  logging.set_verbosity(logging.INFO)
  app.run(main)
