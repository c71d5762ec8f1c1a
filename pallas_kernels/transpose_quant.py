"""Re-tiling an FP8 activation from 1x128 to 128x1 tiles for the weight gradient (DeepSeek-V3 §3.5.2).

The forward pass caches x [M, K] as FP8 with one scale per 1x128 tile along K; dW = x^T @ dy contracts over
the tokens M, so the backward pass needs x^T [K, M] quantized in 1x128 tiles along M. As the paper
describes, the cached FP8 tensor is read, dequantized, transposed and re-quantized (no BF16 copy is kept).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import act_quant, common
from pallas_kernels.common import BLOCK, FP8


def reference(q_MK, scale_MY, scale_fmt: str = 'f32'):
  """(q^T [K, M], scale [K, M/128]) from 1x128-quantized q [M, K], M and K multiples of 128."""
  return act_quant.reference(act_quant.dequantize(q_MK, scale_MY).T, scale_fmt)


def _kernel(q_ref, s_ref, qt_ref, st_ref, *, scale_fmt):
  bm, bk = q_ref.shape
  x = q_ref[...].astype(jnp.float32).reshape(bm, bk // BLOCK, BLOCK) * s_ref[...][:, :, 0].T[:, :, None]
  xt = x.reshape(bm, bk).T.reshape(bk, bm // BLOCK, BLOCK)
  scale = common.scale_from_amax(jnp.max(jnp.abs(xt), axis=-1), scale_fmt)  # [bk, bm/128]
  qt_ref[...] = common.to_fp8(xt, scale[..., None]).reshape(bk, bm)
  st_ref[...] = scale.T[..., None]  # [bm/128, bk, 1]


def pallas(q_MK, scale_YM1, scale_fmt: str = 'f32', *, interpret: bool = False, target: str | None = None,
           block: int = 512):
  """Kernel layouts in and out: scale [K/128, M, 1] -> (q^T [K, M], scale [M/128, K, 1])."""
  m, k = q_MK.shape
  gpu = common.kernel_target(target) == 'gpu'
  bm = common.pick_block(m, block, pow2=gpu)
  bk = common.pick_block(k, block, pow2=gpu)
  return pl.pallas_call(
      functools.partial(_kernel, scale_fmt=scale_fmt),
      grid=(m // bm, k // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
                pl.BlockSpec((bk // BLOCK, bm, 1), lambda i, j: (j, i, 0))],
      out_specs=[pl.BlockSpec((bk, bm), lambda i, j: (j, i)),
                 pl.BlockSpec((bm // BLOCK, bk, 1), lambda i, j: (i, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((k, m), FP8), jax.ShapeDtypeStruct((m // BLOCK, k, 1), jnp.float32)],
      compiler_params=common.compiler_params(gpu, parallel=2),
      interpret=interpret,
      name='transpose_quant',
  )(q_MK, scale_YM1)


def transpose_quant(q_MK, scale_MY, scale_fmt: str = 'f32', impl: str = 'xla'):
  """1x128 tiles along K -> 1x128 tiles along M of the transpose. M, K multiples of 128."""
  if impl == 'xla':
    return reference(q_MK, scale_MY, scale_fmt)
  qt, st = pallas(q_MK, scale_MY.T[..., None], scale_fmt, interpret=common.is_interpret(impl))
  return qt, st[..., 0].T
