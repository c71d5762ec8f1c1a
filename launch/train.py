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

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, tokenizer, sample '
                               '(default runs/<config file name>).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-process run '
                                   'started by hand; without it, TPU pods and SLURM jobs are detected.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Start afresh even where --workdir holds a run (another '
                                'config, or no readable checkpoint): the old run is moved aside, not deleted.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'Split the host CPU into this many devices (meshes on a '
                                    'machine without accelerators); 0: in a single-process run, as many as a mesh '
                                    'of explicit sizes needs.')


class _QuietLibraries(std_logging.Filter):
  """Orbax narrates every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _in_cluster() -> bool:
  """A multi-process job jax.distributed can configure itself from the environment."""
  env = os.environ
  if int(env.get('SLURM_NTASKS', '1')) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '') or 'MEGASCALE_COORDINATOR_ADDRESS' in env


def _config_name() -> str:
  """configs/tiny.py -> tiny (a config file may carry an argument after a colon)."""
  path = config_flags.get_config_filename(flags.FLAGS['config']).split(':')[0]
  return os.path.splitext(os.path.basename(path))[0]


def _mesh_devices(mesh) -> int:
  """Devices a mesh of explicit sizes spans (0 when one size is -1: it fills whatever there is)."""
  sizes = [mesh.data, mesh.expert, mesh.pipeline]
  return 0 if -1 in sizes else sizes[0] * sizes[1] * sizes[2]


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax
  single_process = not _COORDINATOR.value and not _in_cluster()
  cpu_devices = _CPU_DEVICES.value or (_mesh_devices(_CONFIG.value.mesh) if single_process else 0)
  if cpu_devices > 1:  # before the first use of a backend; a machine with accelerators does not use them
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, initialization_timeout=120)
  elif _in_cluster():
    jax.distributed.initialize()  # TPU pod / SLURM / Open MPI: addresses and ranks from the environment
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
