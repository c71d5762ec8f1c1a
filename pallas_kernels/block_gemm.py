"""Block-scaled FP8 GEMM with fp32 promotion every 128 elements of K (DeepSeek-V3 §3.3.2; DeepGEMM).

out[m, n] = sum_c (a[m, c-th 128] . b[c-th 128, n]) * sa[m, c] * sb[c, n], the partial dot of each 128-wide
K block computed with fp32 accumulation and scaled into an fp32 accumulator. a: FP8 [M, K] with one scale per
1x128 tile, sa [M, K/128]; b: FP8 [K, N] with one scale per (128-row block, column), sb [K/128, N] (128x128
block scales repeat along N; the weight gradient's 128x1 tiles do not). Two Pallas bodies:
- TPU (Mosaic): grid (M/bm, N/bn, K/bk), K last and 'arbitrary', an fp32 VMEM accumulator. Before TPU7x the
  MXU has no e4m3 input, so the FP8 tiles are upcast to bf16 in VMEM (exact: e4m3 values are bf16 values).
- GPU (Triton, opt-in): grid (M/bm, N/bn), whole-K blocks and an in-kernel loop over 128-wide K slices.
The XLA path (CPU, default GPU) dequantizes both operands to fp32 and runs one fp32 matmul: the same sum in
another order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import BLOCK

F32 = jnp.float32


def reference(a_MK, sa_MY, b_KN, sb_YN, out_dtype=F32):
  """The kernel's arithmetic in jnp: per-block fp32 partial products, scaled and summed in block order."""
  m, k = a_MK.shape
  n = b_KN.shape[1]
  c = k // BLOCK
  partial_YMN = jnp.einsum('myo,yon->ymn', a_MK.astype(F32).reshape(m, c, BLOCK),
                           b_KN.astype(F32).reshape(c, BLOCK, n), precision=jax.lax.Precision.HIGHEST)
  scaled_YMN = partial_YMN * sa_MY.T[:, :, None] * sb_YN[:, None, :]
  out = scaled_YMN[0]
  for i in range(1, c):
    out = out + scaled_YMN[i]
  return out.astype(out_dtype)


def xla(a_MK, sa_MY, b_KN, sb_YN, out_dtype=F32):
  """Dequantize to fp32, one fp32 matmul (HIGHEST: no bf16 rounding of the inputs on TPU)."""
  a = (a_MK.astype(F32).reshape(a_MK.shape[0], -1, BLOCK) * sa_MY[..., None]).reshape(a_MK.shape)
  b = (b_KN.astype(F32).reshape(-1, BLOCK, b_KN.shape[1]) * sb_YN[:, None, :]).reshape(b_KN.shape)
  return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32).astype(out_dtype)


def accumulate(acc, a_ref, sa_ref, b_ref, sb_ref, upcast):
  """acc + sum over the 128-wide K slices c of the block: dot(a[:, c], b[c, :]) * sa[c] * sb[c] (fp32)."""
  for c in range(a_ref.shape[1] // BLOCK):
    a = a_ref[:, c * BLOCK:(c + 1) * BLOCK]
    b = b_ref[c * BLOCK:(c + 1) * BLOCK, :]
    if upcast is not None:
      a, b = a.astype(upcast), b.astype(upcast)
    acc = acc + jnp.dot(a, b, preferred_element_type=F32) * sa_ref[c] * sb_ref[c]
  return acc


def kgrid_kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref, acc_ref, *, upcast):
  """TPU body: K blocks on the last grid axis, an fp32 VMEM accumulator written out after the last."""
  @pl.when(pl.program_id(2) == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] = accumulate(acc_ref[...], a_ref, sa_ref, b_ref, sb_ref, upcast)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _kloop_kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref, *, upcast):
  bm, bn = o_ref.shape

  def body(c, acc):
    start = pl.multiple_of(c * BLOCK, BLOCK)
    a = a_ref[:, pl.ds(start, BLOCK)]
    b = b_ref[pl.ds(start, BLOCK), :]
    if upcast is not None:
      a, b = a.astype(upcast), b.astype(upcast)
    return acc + jnp.dot(a, b, preferred_element_type=F32) * sa_ref[c] * sb_ref[c]

  acc = jax.lax.fori_loop(0, a_ref.shape[1] // BLOCK, body, jnp.zeros((bm, bn), F32))
  o_ref[...] = acc.astype(o_ref.dtype)


def default_upcast(target: str):
  """bf16 unless the MXU takes e4m3 directly (TPU7x and later); Triton dots e4m3 natively on sm89+."""
  if target == 'gpu' or common.tpu_generation() >= 7:
    return None
  return jnp.bfloat16


def pallas(a_MK, sa_YM1, b_KN, sb_Y1N, out_dtype=F32, *, interpret: bool = False, target: str | None = None,
           block_m: int = 256, block_n: int = 256, block_k: int = 512, upcast='default'):
  """Kernel layouts: sa [K/128, M, 1], sb [K/128, 1, N]; M, N, K multiples of 128."""
  m, k = a_MK.shape
  n = b_KN.shape[1]
  target = common.kernel_target(target)
  upcast = default_upcast(target) if upcast == 'default' else upcast
  gpu = target == 'gpu'
  out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
  if gpu:
    bm = common.pick_block(m, min(block_m, 64), quantum=16, pow2=True)
    bn = common.pick_block(n, block_n // 2, pow2=True)
    return pl.pallas_call(
        functools.partial(_kloop_kernel, upcast=upcast),
        grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((k // BLOCK, bm, 1), lambda i, j: (0, i, 0)),
                  pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((k // BLOCK, 1, bn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=out_shape, compiler_params=common.compiler_params(True, parallel=2), interpret=interpret,
        name='fp8_block_gemm',
    )(a_MK, sa_YM1, b_KN, sb_Y1N)
  bm, bn, bk = common.pick_block(m, block_m), common.pick_block(n, block_n), common.pick_block(k, block_k)
  from jax.experimental.pallas import tpu as pltpu
  return pl.pallas_call(
      functools.partial(kgrid_kernel, upcast=upcast),
      grid=(m // bm, n // bn, k // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((bk // BLOCK, bm, 1), lambda i, j, kk: (kk, i, 0)),
                pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
                pl.BlockSpec((bk // BLOCK, 1, bn), lambda i, j, kk: (kk, 0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((bm, bn), F32)],
      compiler_params=common.compiler_params(False, parallel=2, arbitrary=1),
      interpret=interpret,
      name='fp8_block_gemm',
  )(a_MK, sa_YM1, b_KN, sb_Y1N)


def gemm(a_MK, sa_MY, b_KN, sb_YN, out_dtype=F32, impl: str = 'xla'):
  """Block-scaled product of canonical-layout operands. M is padded to a multiple of 128 for the kernels."""
  if impl == 'xla':
    return xla(a_MK, sa_MY, b_KN, sb_YN, out_dtype)
  m = a_MK.shape[0]
  a_MK, sa_MY = common.pad_axis(a_MK, 0), common.pad_axis(sa_MY, 0)
  out = pallas(a_MK, sa_MY.T[..., None], b_KN, sb_YN[:, None, :], out_dtype, interpret=common.is_interpret(impl))
  return out[:m]
