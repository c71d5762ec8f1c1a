"""Grouped block-scaled FP8 GEMMs for MoE experts (DeepGEMM's m-grouped contiguous and k-grouped layouts).

Rows are tokens laid out by expert, each expert's segment padded to whole tiles (a multiple of 128 rows,
`tile_expert[t]` naming the expert of tile t, ascending), so no 128-row quantization tile straddles two
experts.
- `grouped_gemm` (forward and input gradient): out[tile t] = a[tile t] @ w[tile_expert[t]], block-scaled
  like block_gemm; the TPU kernel scalar-prefetches tile_expert to pick each tile's weight block.
- `grouped_wgrad` (weight gradient): dw[e] = sum over e's tiles of a^T[:, tile] @ b[tile, :], both operands
  quantized in 1x128 tiles along the token axis; the TPU kernel walks tiles innermost and accumulates each
  expert's block in VMEM. Experts without tiles get zeros.
The XLA path (CPU; GPU, where Triton has no scalar prefetch) dequantizes and runs tiled einsums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.block_gemm import F32, accumulate, default_upcast, kgrid_kernel
from pallas_kernels.common import BLOCK


def _tiles(x, n_tiles):
  return x.reshape(n_tiles, -1, *x.shape[1:])


def dequantize_rows(q_UK, s_UY):
  return (q_UK.astype(F32).reshape(q_UK.shape[0], -1, BLOCK) * s_UY[..., None]).reshape(q_UK.shape)


def dequantize_weights(q_EKN, s_EYN):
  e, k, n = q_EKN.shape
  return (q_EKN.astype(F32).reshape(e, -1, BLOCK, n) * s_EYN[:, :, None, :]).reshape(e, k, n)


# Forward / input gradient -----------------------------------------------------------------------------


def gemm_reference(a_UK, sa_UY, w_EKN, sw_EYN, tile_expert, out_dtype=F32):
  """Per tile: the block-scaled sum of block_gemm.reference, in jnp."""
  from pallas_kernels.block_gemm import reference
  n_tiles = tile_expert.shape[0]
  rows = [reference(a, sa, w_EKN[e], sw_EYN[e], out_dtype)
          for a, sa, e in zip(_tiles(a_UK, n_tiles), _tiles(sa_UY, n_tiles), list(tile_expert))]
  return jnp.concatenate(rows)


def gemm_xla(a_UK, sa_UY, w_EKN, sw_EYN, tile_expert, out_dtype=F32):
  a = _tiles(dequantize_rows(a_UK, sa_UY), tile_expert.shape[0])
  w = dequantize_weights(w_EKN, sw_EYN)[tile_expert]
  out = jnp.einsum('jrk,jkn->jrn', a, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)
  return out.reshape(a_UK.shape[0], -1).astype(out_dtype)


def _gemm_kernel(te_ref, *refs, upcast):
  del te_ref  # consumed by the index maps, which pick each tile's expert weight
  kgrid_kernel(*refs, upcast=upcast)


def gemm_pallas(a_UK, sa_YU1, w_EKN, sw_EY1N, tile_expert, out_dtype=F32, *, interpret=False, block_n=256,
                block_k=512, upcast='default'):
  """TPU kernel; kernel scale layouts sa [K/128, U, 1], sw [E, K/128, 1, N]."""
  from jax.experimental.pallas import tpu as pltpu
  u, k = a_UK.shape
  n = w_EKN.shape[2]
  n_tiles = tile_expert.shape[0]
  bm = u // n_tiles
  bn, bk = common.pick_block(n, block_n), common.pick_block(k, block_k)
  upcast = default_upcast('tpu') if upcast == 'default' else upcast
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(n_tiles, n // bn, k // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk, te: (i, kk)),
                pl.BlockSpec((bk // BLOCK, bm, 1), lambda i, j, kk, te: (kk, i, 0)),
                pl.BlockSpec((None, bk, bn), lambda i, j, kk, te: (te[i], kk, j)),
                pl.BlockSpec((None, bk // BLOCK, 1, bn), lambda i, j, kk, te: (te[i], kk, 0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk, te: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), F32)])
  return pl.pallas_call(
      functools.partial(_gemm_kernel, upcast=upcast), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((u, n), out_dtype),
      compiler_params=common.compiler_params(False, parallel=2, arbitrary=1), interpret=interpret,
      name='fp8_grouped_gemm',
  )(tile_expert, a_UK, sa_YU1, w_EKN, sw_EY1N)


def grouped_gemm(a_UK, sa_UY, w_EKN, sw_EYN, tile_expert, out_dtype=F32, impl: str = 'xla'):
  """Canonical layouts: sa [U, K/128], sw [E, K/128, N] (per-column expansion of the 128x128 scales)."""
  if impl == 'xla' or (impl == 'pallas' and jax.default_backend() == 'gpu'):
    return gemm_xla(a_UK, sa_UY, w_EKN, sw_EYN, tile_expert, out_dtype)
  return gemm_pallas(a_UK, sa_UY.T[..., None], w_EKN, sw_EYN[:, :, None, :], tile_expert, out_dtype,
                     interpret=common.is_interpret(impl))


# Weight gradient ----------------------------------------------------------------------------------------


def wgrad_reference(at_KU, sat_KY, b_UN, sb_YN, tile_expert, n_experts: int):
  """dw[e] = sum over e's tiles of block-scaled a^T[:, tile] @ b[tile, :], tile by tile in jnp."""
  from pallas_kernels.block_gemm import reference
  n_tiles = tile_expert.shape[0]
  tile = at_KU.shape[1] // n_tiles
  out = jnp.zeros((n_experts, at_KU.shape[0], b_UN.shape[1]), F32)
  for t, e in enumerate(list(tile_expert)):
    rows = slice(t * tile, (t + 1) * tile)
    blocks = slice(t * tile // BLOCK, (t + 1) * tile // BLOCK)
    out = out.at[e].add(reference(at_KU[:, rows], sat_KY[:, blocks], b_UN[rows], sb_YN[blocks]))
  return out


def wgrad_xla(at_KU, sat_KY, b_UN, sb_YN, tile_expert, n_experts: int):
  n_tiles = tile_expert.shape[0]
  a = _tiles(dequantize_rows(at_KU, sat_KY).T, n_tiles)  # [T, tile, K]
  b = _tiles((b_UN.astype(F32).reshape(-1, BLOCK, b_UN.shape[1]) * sb_YN[:, None, :]).reshape(b_UN.shape), n_tiles)
  per_tile = jnp.einsum('jrk,jrn->jkn', a, b, precision=jax.lax.Precision.HIGHEST)
  return jax.ops.segment_sum(per_tile, tile_expert, num_segments=n_experts, indices_are_sorted=True)


def _wgrad_kernel(te_ref, at_ref, sat_ref, b_ref, sb_ref, o_ref, acc_ref, *, upcast):
  t, last_tile = pl.program_id(2), pl.num_programs(2) - 1
  expert = te_ref[t]
  first = (t == 0) | (te_ref[jnp.maximum(t - 1, 0)] != expert)
  last = (t == last_tile) | (te_ref[jnp.minimum(t + 1, last_tile)] != expert)

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] = accumulate(acc_ref[...], at_ref, sat_ref, b_ref, sb_ref, upcast)

  @pl.when(last)
  def _():
    o_ref[...] = acc_ref[...]


def wgrad_pallas(at_KU, sat_YK1, b_UN, sb_Y1N, tile_expert, n_experts: int, *, interpret=False, block_k=256,
                 block_n=256, upcast='default'):
  """TPU kernel; kernel scale layouts sat [U/128, K, 1], sb [U/128, 1, N]. Unvisited experts hold garbage."""
  from jax.experimental.pallas import tpu as pltpu
  k, u = at_KU.shape
  n = b_UN.shape[1]
  n_tiles = tile_expert.shape[0]
  tile = u // n_tiles
  bk, bn = common.pick_block(k, block_k), common.pick_block(n, block_n)
  upcast = default_upcast('tpu') if upcast == 'default' else upcast
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(k // bk, n // bn, n_tiles),
      in_specs=[pl.BlockSpec((bk, tile), lambda i, j, t, te: (i, t)),
                pl.BlockSpec((tile // BLOCK, bk, 1), lambda i, j, t, te: (t, i, 0)),
                pl.BlockSpec((tile, bn), lambda i, j, t, te: (t, j)),
                pl.BlockSpec((tile // BLOCK, 1, bn), lambda i, j, t, te: (t, 0, j))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda i, j, t, te: (te[t], i, j)),
      scratch_shapes=[pltpu.VMEM((bk, bn), F32)])
  return pl.pallas_call(
      functools.partial(_wgrad_kernel, upcast=upcast), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((n_experts, k, n), F32),
      compiler_params=common.compiler_params(False, parallel=2, arbitrary=1), interpret=interpret,
      name='fp8_grouped_wgrad',
  )(tile_expert, at_KU, sat_YK1, b_UN, sb_Y1N)


def grouped_wgrad(at_KU, sat_KY, b_UN, sb_YN, tile_expert, n_experts: int, impl: str = 'xla'):
  """dW [E, K, N] in fp32 from a^T [K, U] (scales [K, U/128]) and b [U, N] (scales [U/128, N])."""
  if impl == 'xla' or (impl == 'pallas' and jax.default_backend() == 'gpu'):
    return wgrad_xla(at_KU, sat_KY, b_UN, sb_YN, tile_expert, n_experts)
  out = wgrad_pallas(at_KU, sat_KY.T[..., None], b_UN, sb_YN[:, None, :], tile_expert, n_experts,
                     interpret=common.is_interpret(impl))
  visited_E = jnp.bincount(tile_expert, length=n_experts) > 0  # the kernel never writes the others
  return jnp.where(visited_E[:, None, None], out, 0.0)
