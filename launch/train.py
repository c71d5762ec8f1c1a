r"""Train a DeepSeek-V3 model (absl). Rerun the same command to resume from the newest checkpoint.

  python -m launch.train --config=configs/demo.py --workdir=runs/demo [--config.steps=1000 ...]
  python -m launch.train --config=configs/tiny.py --workdir=runs/mesh --cpu_devices=8 \
      --config.mesh.data=2 --config.mesh.expert=4     # a data x expert mesh of 8 CPU devices
  python -m launch.train --config=configs/tiny.py --config.mesh.data=2 --config.mesh.expert=2 \
      --config.mesh.pipeline=2    # data x expert x 1F1B pipeline; the CPU splits into the 8 devices it needs

A rerun that differs from the run in --workdir (architecture, data), or finds none of its checkpoints
readable, is refused with the reason and nothing touched; --overwrite starts afresh and moves the old run to
WORKDIR.replaced-<time>. Errors in the config or the data end the run with one line naming the field or file.
"""

import ast
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.run_dir import RunDirError
from deepseek_jax.trainer import train
from launch import processes

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, tokenizer, sample '
                               '(default runs/<config file name>).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Start afresh even where --workdir holds a run (another '
                                'config, or no readable checkpoint): the old run is moved aside, not deleted.')


class _QuietLibraries(std_logging.Filter):
  """Orbax narrates every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _config_name() -> str:
  """configs/tiny.py -> tiny (a config file may carry an argument after a colon)."""
  path = config_flags.get_config_filename(flags.FLAGS['config']).split(':')[0]
  return os.path.splitext(os.path.basename(path))[0]


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  mesh = _CONFIG.value.mesh
  processes.start((mesh.pipeline, mesh.data, mesh.expert))
  logging.info('config:\n%s', _CONFIG.value)
  workdir = _WORKDIR.value or os.path.join('runs', _config_name())
  try:
    result = train(_CONFIG.value, workdir, overwrite=_OVERWRITE.value)
  except (RunDirError, ValueError, FileNotFoundError, FloatingPointError) as error:
    logging.debug('the traceback (shown with --verbosity=1):', exc_info=True)
    sys.exit(f'error: {error}')  # exit status 1; the message names the field, file or directory at fault
  if result.preempted:
    print(f'stopped at step {result.step} on request; rerun the same command to resume')
    return
  print(f'step {result.step}: validation loss {result.val_loss:.4f} nats/token')
  if result.sample is not None:
    print('sample:\n' + result.sample)


def _parse_flags(argv):
  """absl's parsing, with an override of a key the config does not have (--config.stepz=3) reported as a
  usage error naming it instead of a traceback from inside ml_collections."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:  # what absl's own parser reports the same way
    sys.exit(f'FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on flags.')
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    message = str(error)
    while message[:1] in '"\'' and message[-1:] == message[:1]:  # ml_collections wraps a KeyError's repr
      message = ast.literal_eval(message)
    sys.exit(f'FATAL Flags parsing error: --config override: {" ".join(message.split())}\n'
             'Overrides name keys the config file sets (configs/common.py lists them); architecture fields go '
             'under --config.model_overrides.<ModelConfig field>.')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=_parse_flags)
