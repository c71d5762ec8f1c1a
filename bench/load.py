r"""Streaming load_hf: host memory and throughput of loading an official-format checkpoint onto one device, a
2 x 4 mesh of 8 CPU devices, and 2 processes x 4 devices over loopback.

  python bench/load.py [--experts=32 --dim=512 --layers=3 --repeats=3]

Each load runs in a fresh process: peak resident memory (VmHWM) after the load minus the resident memory before
it, less the bytes of the model the process's devices hold (on CPU the devices' memory is this process's),
against the largest checkpoint tensor; and bytes read per second. Writes the "Loading (load_hf)" section of
docs/benchmarks.md.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402

_EXPERTS = flags.DEFINE_integer('experts', 32, 'Routed experts per MoE layer.')
_DIM = flags.DEFINE_integer('dim', 512, 'Model width (also the expert width).')
_LAYERS = flags.DEFINE_integer('layers', 3, 'Layers (the first dense).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Loads per setting (a fresh process each; medians reported).')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r'''
import json, sys
import jax
devices, mesh_kind = int(sys.argv[2]), sys.argv[3]
jax.config.update('jax_num_cpu_devices', devices)
if mesh_kind == 'two_processes':
  jax.distributed.initialize(coordinator_address=sys.argv[4], num_processes=2, process_id=int(sys.argv[5]),
                             initialization_timeout=60)
import numpy as np
from flax import nnx
from deepseek_jax import sharding
from deepseek_jax.hf import load_hf
from deepseek_jax.safetensors_io import SafetensorsDir

def status(key):
  for line in open('/proc/self/status'):
    if line.startswith(key):
      return int(line.split()[1]) * 1024

store = SafetensorsDir(sys.argv[1])
largest = max(int(np.prod(store.shape(n))) for n in store.names()) * 4
del store
mesh = None if mesh_kind == 'one_device' else sharding.make_mesh(data=2, expert=4)
jax.device_put(np.zeros(4)).block_until_ready()  # the runtime up before the baseline
before = status('VmRSS')
report = {}
_, model = load_hf(sys.argv[1], mesh=mesh, report=report)
held = sum(s.data.nbytes for _, v in nnx.to_flat_state(nnx.state(model)) for s in v[...].addressable_shards)
print(json.dumps({'peak_extra': status('VmHWM') - before, 'held': held, 'largest': largest, **report}))
'''


def _run(path, mesh_kind):
  if mesh_kind != 'two_processes':
    devices = 1 if mesh_kind == 'one_device' else 8
    done = subprocess.run([sys.executable, '-c', CHILD, path, str(devices), mesh_kind], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=True)
    return [json.loads(done.stdout.strip().splitlines()[-1])]
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  processes = [subprocess.Popen([sys.executable, '-c', CHILD, path, '4', mesh_kind, f'127.0.0.1:{port}', str(i)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    if p.returncode:
      raise RuntimeError(err[-3000:])
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def main(argv):
  del argv
  from flax import nnx
  from deepseek_jax.config import PRESETS, Runtime
  from deepseek_jax.hf import HOST_BLOCK_TENSORS, save_hf
  from deepseek_jax.model import DeepSeekV3
  d = _DIM.value
  cfg = PRESETS['tiny'].replace(dim=d, inter_dim=2 * d, moe_inter_dim=d, n_routed_experts=_EXPERTS.value,
                                n_expert_groups=1, n_limited_groups=1, n_layers=_LAYERS.value, vocab_size=4096,
                                q_lora_rank=d // 2, kv_lora_rank=d // 4)
  path = os.path.join(tempfile.mkdtemp(prefix='load_bench_'), 'ckpt')
  save_hf(cfg, DeepSeekV3(cfg, Runtime(), nnx.Rngs(0)), path)
  file_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
  rows = []
  for kind in ('one_device', 'mesh_2x4', 'two_processes'):
    runs = [_run(path, kind) for _ in range(_REPEATS.value)]
    for p in range(len(runs[0])):
      r = lambda key: statistics.median(run[p][key] for run in runs)
      largest = runs[0][p]['largest']
      extra = r('peak_extra') - r('held')
      rows.append(f'| {kind.replace("_", " ")}{f" (process {p})" if len(runs[0]) > 1 else ""} | '
                  f'{r("total_bytes") / 1e6:,.1f} | {r("held") / 1e6:,.1f} | {r("bytes_read") / 1e6:,.1f} | '
                  f'{largest / 1e6:,.2f} | {r("peak_extra") / 1e6:,.1f} | {extra / 1e6:,.1f} | {extra / largest:.1f} | '
                  f'{r("seconds"):.2f} | {r("bytes_read") / r("seconds") / 1e6:,.0f} |')
  body = (f'Command: `python bench/load.py --experts={_EXPERTS.value} --dim={_DIM.value} --layers={_LAYERS.value} '
          f'--repeats={_REPEATS.value}` ({os.cpu_count()} CPU cores, jax {__import__("jax").__version__}). A random '
          f'fp32 checkpoint of {file_bytes / 1e6:,.1f} MB ({_LAYERS.value} layers, {_EXPERTS.value} routed experts '
          f'of width {d}) loaded by `load_hf` in a fresh process per load; medians of {_REPEATS.value}. "Extra" is '
          'the peak resident memory during the load above the memory before it, less the bytes the process\'s '
          'devices hold afterwards (on CPU those are host memory too); it includes the JAX runtime\'s own '
          f'growth. A device block up to {HOST_BLOCK_TENSORS} x the largest tensor is assembled on the host, a '
          'larger one in place on the device, one (layer, expert) slice at a time.\n\n'
          '| load | model MB | held by process MB | read MB | largest tensor MB | peak above start MB | extra MB | '
          'extra / largest tensor | seconds | read MB/s |\n|---|---|---|---|---|---|---|---|---|---|\n' +
          '\n'.join(rows))
  print(body)
  replace_section('Loading (load_hf)', body)


if __name__ == '__main__':
  app.run(main)
