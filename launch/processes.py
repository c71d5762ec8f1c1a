"""The launchers' devices and processes: CPU device splitting and `jax.distributed` start-up, one place.

A multi-process run is started by hand (--coordinator_address, --num_processes, --process_id on every
process) or detected from a TPU pod's, SLURM's or Open MPI's environment, which jax.distributed reads itself.
"""

import math
import os

from absl import flags

_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-process run '
                                   'started by hand; without it, TPU pods and SLURM jobs are detected.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'Split the host CPU into this many devices (meshes on a '
                                    'machine without accelerators); 0: in a single-process run, as many as a mesh '
                                    'of explicit sizes needs.')


def _in_cluster() -> bool:
  """A multi-process job jax.distributed can configure itself from the environment."""
  env = os.environ
  if int(env.get('SLURM_NTASKS', '1')) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '') or 'MEGASCALE_COORDINATOR_ADDRESS' in env


def start(mesh_sizes) -> None:
  """Before the first use of a backend: CPU devices for the mesh, then jax.distributed for a multi-process
  run. mesh_sizes: the mesh's axis sizes (-1 fills: then no device count is implied)."""
  import jax
  single_process = not _COORDINATOR.value and not _in_cluster()
  implied = 0 if -1 in mesh_sizes else math.prod(mesh_sizes)
  cpu_devices = _CPU_DEVICES.value or (implied if single_process else 0)
  if cpu_devices > 1:  # a machine with accelerators does not use them
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, initialization_timeout=120)
  elif _in_cluster():
    jax.distributed.initialize()  # TPU pod / SLURM / Open MPI: addresses and ranks from the environment
