r"""Per-device memory of v3-671b from the real sharding rules on AbstractMeshes (no devices needed).

  python bench/memory_plan.py [--batch=256 --context=8192]

Training: the whole train state (fp32 master weights, bf16 AdamW moments, counters) and the fp32 gradients,
each laid out by sharding.state_shardings. Decoding: the weights held as FP8 (128x128-block scales included) and
the absorbed-MLA latent cache of `--batch` sequences of `--context` positions, its rows split over the data x
expert devices (attention data-parallel, the cache never duplicated per head). Activations and compiled
temporaries are not counted. Writes the "Per-device memory of v3-671b (sharding rules)" section of
docs/benchmarks.md.
"""

import math
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402

_BATCH = flags.DEFINE_integer('batch', 256, 'Decoding: sequences in the latent cache.')
_CONTEXT = flags.DEFINE_integer('context', 8192, 'Decoding: positions per sequence.')

# (what, device, HBM GB, (pipeline, data, expert))
TRAINING = (('TPU v6e-256', 32, (1, 32, 8)), ('TPU v6e-512', 32, (1, 64, 8)), ('2,048 H800', 80, (1, 256, 8)),
            ('2,048 H800, 2 pipeline stages', 80, (2, 128, 8)))
DECODING = (('8 x H200', 141, (1, 1, 8)), ('TPU v6e-32', 32, (1, 4, 8)), ('TPU v6e-64', 32, (1, 8, 8)))


def _per_device(abstract, mesh) -> int:
  import jax
  import numpy as np
  from flax import nnx
  from deepseek_jax import sharding
  specs = sharding.state_shardings(abstract, mesh)
  is_var = lambda x: isinstance(x, nnx.Variable)
  total = 0
  for leaf, named in zip(jax.tree.leaves(abstract, is_leaf=is_var), jax.tree.leaves(specs, is_leaf=is_var)):
    named = named.get_value() if is_var(named) else named
    total += math.prod(named.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def main(argv):
  del argv
  import jax
  from flax import nnx
  from deepseek_jax import cache as kv
  from deepseek_jax.config import PRESETS, Runtime
  from deepseek_jax.model import DeepSeekV3
  from deepseek_jax.optimizer import adamw
  from deepseek_jax.sharding import MESH_AXES
  from deepseek_jax.train_step import init_train_state
  cfg = PRESETS['v3-671b']
  train_rt = Runtime(param_dtype='float32', dtype='bfloat16', quant='fp8', remat=True)
  _, state = nnx.eval_shape(lambda: init_train_state(DeepSeekV3(cfg, train_rt, nnx.Rngs(0)), adamw()))
  serve = nnx.state(nnx.eval_shape(lambda: DeepSeekV3(cfg, Runtime(param_dtype='bfloat16', dtype='bfloat16',
                                                                  fp8_weights=True), nnx.Rngs(0))))
  cache = jax.eval_shape(lambda: kv.zeros(kv.CacheForm.ABSORBED, cfg, 1, 1, jax.numpy.bfloat16, cfg.n_layers))
  per_token = kv.bytes_per_token(kv.Cache(None, cache, ()))
  rows = ['| use | machine (mesh: pipeline x data x expert) | state / weights GB per device | gradients GB | '
          'latent cache GB | total GB | of HBM |', '|---|---|---|---|---|---|---|']
  for name, hbm, sizes in TRAINING:
    mesh = jax.sharding.AbstractMesh(sizes, MESH_AXES)
    weights = _per_device(state, mesh)
    grads = _per_device(state.params, mesh)  # fp32, laid out as the master weights
    total = weights + grads
    rows.append(f'| training | {name} ({" x ".join(map(str, sizes))}) | {weights / 1e9:.1f} | {grads / 1e9:.1f} | - | '
                f'{total / 1e9:.1f} | {total / (hbm * 1e9):.0%} |')
  for name, hbm, sizes in DECODING:
    mesh = jax.sharding.AbstractMesh(sizes, MESH_AXES)
    weights = _per_device(serve, mesh)
    latent = per_token * _BATCH.value * _CONTEXT.value / (sizes[1] * sizes[2])
    total = weights + latent
    rows.append(f'| decoding | {name} ({" x ".join(map(str, sizes))}) | {weights / 1e9:.1f} | - | {latent / 1e9:.1f} | '
                f'{total / 1e9:.1f} | {total / (hbm * 1e9):.0%} |')
  body = (f'Command: `python bench/memory_plan.py --batch={_BATCH.value} --context={_CONTEXT.value}` (jax '
          f'{jax.__version__}): eval_shape of v3-671b and `sharding.state_shardings` on AbstractMeshes, no devices. '
          'Training: the train state (fp32 master weights, bf16 AdamW moments) and fp32 gradients per device; '
          'decoding: the weights held as FP8 with their block scales, and the absorbed latent cache '
          f'({per_token:,} B per position in bf16) of {_BATCH.value} sequences x {_CONTEXT.value:,} positions with '
          'its rows split over data x expert. Activations, compiled temporaries and the runtime are not counted, '
          'so the last column is a floor. With pipeline stages each stage holds its half of the 58 stacked MoE '
          'layers, while the embedding, dense layers, head and MTP are not split over the pipeline axis (every '
          'stage keeps its data x expert shards of them). HBM: v6e 32 GB, H800 80 GB, H200 141 GB.\n\n'
          + '\n'.join(rows))
  print(body)
  replace_section('Per-device memory of v3-671b (sharding rules)', body)


if __name__ == '__main__':
  app.run(main)
