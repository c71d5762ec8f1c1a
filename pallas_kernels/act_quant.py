"""Activation quantization, one scale per 1x128 tile of a row (DeepSeek-V3 §3.3.1; official act_quant).

act_quant(x [..., K]) -> (q [..., K'] float8_e4m3fn, scale [..., K'/128] float32), K' = K rounded up to a
multiple of 128 (zero columns pad it). The Pallas kernel walks (row block, column block) tiles; each row
of a column block holds bk/128 tiles, reduced to their amax in one vectorised reshape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import BLOCK, FP8


def reference(x_MK, scale_fmt: str = 'f32'):
  """Pure-jnp act_quant on K that is a multiple of 128: (q [M, K], scale [M, K/128])."""
  m, k = x_MK.shape
  tiles = x_MK.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK)
  scale_MY = common.scale_from_amax(jnp.max(jnp.abs(tiles), axis=-1), scale_fmt)
  return common.to_fp8(tiles, scale_MY[..., None]).reshape(m, k), scale_MY


def _kernel(x_ref, q_ref, s_ref, *, scale_fmt):
  bm, bk = x_ref.shape
  tiles = x_ref[...].astype(jnp.float32).reshape(bm, bk // BLOCK, BLOCK)
  scale = common.scale_from_amax(jnp.max(jnp.abs(tiles), axis=-1), scale_fmt)  # [bm, bk/128]
  q_ref[...] = common.to_fp8(tiles, scale[..., None]).reshape(bm, bk)
  s_ref[...] = scale.T[..., None]  # kernel layout [bk/128, bm, 1]


def pallas(x_MK, scale_fmt: str = 'f32', *, interpret: bool = False, target: str | None = None,
           block_m: int = 256, block_k: int = 2048):
  """The kernel on M a multiple of 8 and K a multiple of 128; returns (q [M, K], scale [K/128, M, 1]).
  target: 'tpu' (Mosaic) or 'gpu' (Triton); default: the current backend's."""
  m, k = x_MK.shape
  gpu = common.kernel_target(target) == 'gpu'
  bm = common.pick_block(m, block_m, quantum=8, pow2=gpu)
  bk = common.pick_block(k, block_k, pow2=gpu)
  return pl.pallas_call(
      functools.partial(_kernel, scale_fmt=scale_fmt),
      grid=(m // bm, k // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j: (i, j))],
      out_specs=[pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
                 pl.BlockSpec((bk // BLOCK, bm, 1), lambda i, j: (j, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((m, k), FP8), jax.ShapeDtypeStruct((k // BLOCK, m, 1), jnp.float32)],
      compiler_params=common.compiler_params(gpu, parallel=2),
      interpret=interpret,
      name='act_quant',
  )(x_MK)


def act_quant(x, scale_fmt: str = 'f32', impl: str = 'xla'):
  """Quantize the last axis in 1x128 tiles. impl: 'xla', 'pallas' (TPU / GPU Triton), 'interpret'."""
  lead, k = x.shape[:-1], x.shape[-1]
  x_MK = common.pad_axis(x.reshape(-1, k), 1)
  if impl == 'xla':
    q, s = reference(x_MK, scale_fmt)
  else:
    m = x_MK.shape[0]
    x_MK = common.pad_axis(x_MK, 0, 8)
    q, s = pallas(x_MK, scale_fmt, interpret=common.is_interpret(impl))
    q, s = q[:m], s[:, :m, 0].T
  return q.reshape(*lead, -1), s.reshape(*lead, -1)


def dequantize(q, scale):
  """q [..., K] * scale [..., K/128] in float32 (the inverse of act_quant up to rounding)."""
  tiles = q.astype(jnp.float32).reshape(*q.shape[:-1], -1, BLOCK)
  return (tiles * scale[..., None]).reshape(q.shape)

