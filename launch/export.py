r"""Export a training run as an official-format Hugging Face directory (absl).

  python -m launch.export --workdir=runs/demo --out=exports/demo
  python -m launch.export --workdir=runs/ft --out=exports/ft --dtype=float32 --mesh.expert=8

Writes config.json (DeepseekV3ForCausalLM), sharded safetensors in the official tensor names and layout (the
MTP module as layer n_layers, as DeepSeek ships it) and the run's tokenizer (tokenizer.json, and a
tokenizer_config.json naming its end-of-text token), from the run's newest readable checkpoint: weights only,
restored onto the given mesh (default one device) and read out one tensor (one expert of one layer) at a time.
transformers' `DeepseekV3ForCausalLM.from_pretrained`, `load_hf` and `launch.decode --hf_dir` read the result.
The directory appears complete or not at all (written beside --out, then renamed); an existing --out is
refused.
"""

import os
import shutil
import sys
import time

from absl import app, flags, logging

from deepseek_jax import data, run_dir, sharding
from deepseek_jax.config import Runtime
from deepseek_jax.hf import save_hf
from deepseek_jax.safetensors_io import write_json
from deepseek_jax.trainer import restore_model
from launch import processes

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run directory written by launch/train.py.')
_OUT = flags.DEFINE_string('out', None, 'The Hugging Face directory to create.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'],
                           'Weight dtype of the files (the run keeps fp32 master weights).')
_SHARD_GB = flags.DEFINE_float('max_shard_gb', 5.0, 'Largest safetensors file, in GB (HF splits at 5).')
_MESH_DATA = flags.DEFINE_integer('mesh.data', 1, 'Devices the restored weights split over (FSDP).')
_MESH_EXPERT = flags.DEFINE_integer('mesh.expert', 1, 'Devices the routed experts split over.')


def main(argv):
  del argv
  processes.start((1, _MESH_DATA.value, _MESH_EXPERT.value))
  import jax
  try:
    if jax.process_count() > 1:
      raise ValueError('launch.export runs as one process: restore the run onto the devices of one host '
                       '(--mesh.data / --mesh.expert)')
    mesh = sharding.make_mesh(data=_MESH_DATA.value, expert=_MESH_EXPERT.value)
    step = export(_WORKDIR.value, _OUT.value, _DTYPE.value, int(_SHARD_GB.value * 1e9), mesh)
  except (ValueError, FileNotFoundError, FileExistsError) as error:
    logging.debug('the traceback (shown with --verbosity=1):', exc_info=True)
    sys.exit(f'error: {error}')
  print(f'step {step} of {_WORKDIR.value} -> {_OUT.value} ({_DTYPE.value})')


def export(workdir: str, out: str, dtype: str = 'bfloat16', max_shard_bytes: int = 5 * 10**9, mesh=None) -> int:
  """Writes the run in `workdir` to the new HF directory `out` (weights restored onto `mesh`, default one
  device); returns the checkpoint step exported."""
  if os.path.exists(out):
    raise FileExistsError(f'--out={out} exists; give a new directory (an export never overwrites one)')
  cfg, model, step = restore_model(workdir, Runtime(param_dtype=dtype, dtype=dtype), mesh)
  partial = f'{out.rstrip(os.sep)}.partial-{os.getpid()}'
  shutil.rmtree(partial, ignore_errors=True)
  start = time.time()
  save_hf(cfg, model, partial, max_shard_bytes)
  _write_tokenizer(workdir, partial, cfg.max_seq_len)
  os.rename(partial, out)
  logging.info('exported step %d of %s to %s in %.1fs', step, workdir, out, time.time() - start)
  return step


def _write_tokenizer(workdir: str, out: str, max_seq_len: int) -> None:
  """The run's tokenizer.json and its tokenizer_config.json (a fine-tuned model's own, copied when the run
  started from a HF directory; else one naming the run BPE's end-of-text token)."""
  directory = os.path.join(workdir, 'data')
  if not os.path.exists(os.path.join(directory, 'tokenizer.json')):
    given = run_dir.recorded_data(workdir).get('tokenizer_path')  # a token-file run's optional tokenizer
    if not given:
      logging.warning('%s has no tokenizer (a token-file run without data.tokenizer_path): exporting weights only',
                      workdir)
      return
    directory = os.path.dirname(given)
    shutil.copy(given, os.path.join(out, 'tokenizer.json'))
  else:
    shutil.copy(os.path.join(directory, 'tokenizer.json'), os.path.join(out, 'tokenizer.json'))
  settings = os.path.join(directory, 'tokenizer_config.json')
  if os.path.exists(settings):
    shutil.copy(settings, os.path.join(out, 'tokenizer_config.json'))
  else:
    write_json(os.path.join(out, 'tokenizer_config.json'), {
        'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': data.EOS, 'add_bos_token': False,
        'model_max_length': max_seq_len})


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
