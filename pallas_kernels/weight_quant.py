"""Weight quantization, one scale per 128x128 block (DeepSeek-V3 §3.3.1; the checkpoint's weight_scale_inv).

weight_quant(w [K, N]) -> (q [K', N'] float8_e4m3fn, scale [K'/128, N'/128] float32) for weights stored
[in, out], K' and N' rounded up to multiples of 128 (zero-padded, as the official converter pads edge
blocks). The kernel also emits the per-column expansion [K'/128, 1, N'] that the GEMM kernels read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import BLOCK, FP8


def reference(w_KN, scale_fmt: str = 'f32'):
  """Pure-jnp block quantization of a [K, N] weight with K, N multiples of 128: (q, scale [K/128, N/128])."""
  k, n = w_KN.shape
  blocks = w_KN.astype(jnp.float32).reshape(k // BLOCK, BLOCK, n // BLOCK, BLOCK)
  scale_YZ = common.scale_from_amax(jnp.max(jnp.abs(blocks), axis=(1, 3)), scale_fmt)
  return common.to_fp8(blocks, scale_YZ[:, None, :, None]).reshape(k, n), scale_YZ


def _kernel(w_ref, q_ref, s_ref, *, scale_fmt):
  bk, bn = w_ref.shape
  blocks = w_ref[...].astype(jnp.float32).reshape(bk // BLOCK, BLOCK, bn // BLOCK, BLOCK)
  scale = common.scale_from_amax(jnp.max(jnp.max(jnp.abs(blocks), axis=3), axis=1), scale_fmt)  # [bk/128, bn/128]
  q_ref[...] = common.to_fp8(blocks, scale[:, None, :, None]).reshape(bk, bn)
  s_ref[...] = jnp.broadcast_to(scale[:, :, None], (bk // BLOCK, bn // BLOCK, BLOCK)).reshape(bk // BLOCK, 1, bn)


def pallas(w_KN, scale_fmt: str = 'f32', *, interpret: bool = False, target: str | None = None,
           block_k: int = 512, block_n: int = 1024):
  """The kernel on K, N multiples of 128; returns (q [K, N], per-column scale [K/128, 1, N])."""
  k, n = w_KN.shape
  gpu = common.kernel_target(target) == 'gpu'
  bk = common.pick_block(k, block_k, pow2=gpu)
  bn = common.pick_block(n, block_n, pow2=gpu)
  return pl.pallas_call(
      functools.partial(_kernel, scale_fmt=scale_fmt),
      grid=(k // bk, n // bn),
      in_specs=[pl.BlockSpec((bk, bn), lambda i, j: (i, j))],
      out_specs=[pl.BlockSpec((bk, bn), lambda i, j: (i, j)),
                 pl.BlockSpec((bk // BLOCK, 1, bn), lambda i, j: (i, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((k, n), FP8), jax.ShapeDtypeStruct((k // BLOCK, 1, n), jnp.float32)],
      compiler_params=common.compiler_params(gpu, parallel=2),
      interpret=interpret,
      name='weight_quant',
  )(w_KN)


def weight_quant(w_KN, scale_fmt: str = 'f32', impl: str = 'xla'):
  """128x128-block quantization of a [K, N] weight: (q [K', N'], scale [K'/128, N'/128])."""
  w_KN = common.pad_axis(common.pad_axis(w_KN, 0), 1)
  if impl == 'xla':
    return reference(w_KN, scale_fmt)
  q, s = pallas(w_KN, scale_fmt, interpret=common.is_interpret(impl))
  return q, s[:, 0, ::BLOCK]


def dequantize(q_KN, scale_YZ):
  """q * scale of its 128x128 block, float32 (the official weight_dequant on [in, out] weights)."""
  k, n = q_KN.shape
  blocks = q_KN.astype(jnp.float32).reshape(k // BLOCK, BLOCK, n // BLOCK, BLOCK)
  return (blocks * scale_YZ[:, None, :, None]).reshape(k, n)
