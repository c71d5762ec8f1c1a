"""Dropless expert dispatch: routed token copies grouped by expert, one grouped matmul per expert weight.

`plan(experts_XK, E, impl)` is computed once per MoE layer; then `gather` lays the tokens out by expert,
`read` takes from an expert stack [E, ...] the weights the layout multiplies (weights held quantized are read
in their stored form and dequantized after), `matmul` multiplies each group by its expert's weight, and
`combine` sums every token's K expert outputs with its gate weights. Training work grows with the routed
copies M = X * K, not with E:
- 'ragged_dot' (TPU): copies sorted by expert, `jax.lax.ragged_dot` (a native grouped GEMM there). XLA:CPU
  expands ragged_dot into a dense masked product over every group (cost x E), so it is not used on CPU.
- 'host' (CPU): the same sorted layout, each expert's rows times its weight in one BLAS call on the host
  (host_gmm.py): exactly M * A * O multiply-adds for any E.
- 'tiled' (GPU, and the FP8 recipe everywhere: it quantizes whole 128-row tiles): each expert's copies
  padded to a multiple of a row tile; every tile multiplies by its expert's weight in one batched matmul. A
  custom VJP recomputes the per-tile weight gather in the backward pass instead of storing it, and sums the
  weight gradient per expert. Work is (M + E * tile) * A * O with tiles of 128-256 rows (XLA:CPU runs
  smaller batched matmuls far below its dense speed): 2x the ideal at 64 experts, 5x at 256 on the demo's
  8,192 copies (bench/train_throughput.py).
Decoding, where a step is bound by the bytes of expert weights it reads (each expert's once at best):
- 'dense': the C = min(E, M) candidate experts (the distinct experts the copies chose, padded to a static C
  with an unused id; all E when M >= E, with no gather) are read once each, and every token multiplies by
  every candidate, its gate weight zero where it did not choose it: weight reads C * A * O (the minimum,
  the distinct experts touched, when they fill C), work X * C * A * O.
- 'gather': each copy multiplies by its own expert's gathered weight: work M * A * O, but the gather writes
  and reads M weight copies (a copy per row even when rows share an expert).
- 'native' (CPU): not a layout but one native kernel for the whole routed SwiGLU and its gate-weighted sum
  (cpu_kernels.py, called by moe.RoutedExperts): each expert with rows read once from its stack, work
  M * A * O; a differentiated call runs the 'host' layout instead.
'auto' (measured on the demo shapes, 16 experts top-4, docs/benchmarks.md "Decoding"): on CPU 'native' for
float weights at every size where the kernels are built (bench/decode.py's rows table has it ahead of every
layout from 1 to 32 rows). Otherwise gather while M < E (the copies are nearly all distinct experts: gather
reads about the minimum and needs no sort), dense once M >= E up to DENSE_ROWS tokens (every expert is likely
touched: each read once, no copy), else ragged_dot on TPU, host on CPU and tiled elsewhere. On CPU dense does
E / K times the multiply-adds of the copies, and the host loop's exact work overtakes it once X * E passes
CPU_DENSE_WORK rows (dense ahead at 8 tokens, host from 16, measured before the native kernel).

Letters beyond model.py's key: A / O the input / output features of an expert weight, Y row tiles, Z the rows
of one tile, C the candidate experts of the dense layout.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax import cpu_kernels, host_gmm
from pallas_kernels.fp8_linear import fp8_grouped_linear

IMPLS = ('auto', 'native', 'ragged_dot', 'host', 'tiled', 'dense', 'gather')
# 'auto' multiplies every token by every expert up to this many tokens: dense's X * E rows of work stay below
# tiled's M + E * tile padded rows (tile >= 128) up to X = 170 at 16 experts top-4 and X = 132 at V3's 256 top-8;
# measured on CPU (demo run, 32 rows speculative = 64 tokens a step): dense 26 ms a step, tiled 48.
DENSE_ROWS = 128
# On CPU the host loop (exact work, two callbacks a layer) beats dense beyond this many token x expert rows:
# measured on the demo shapes (16 experts top-4, bench/decode.py's rows table), dense ahead at 8 tokens
# (128 rows), host from 16 (256 rows).
CPU_DENSE_WORK = 128


def resolve(impl: str, x: int, k: int, n_experts: int, backend: str | None = None, native: bool = True) -> str:
  """'auto' for x tokens with k experts each on `backend` (default: JAX's): on CPU the native kernel where it
  is built and the caller can use it (`native`: float weights), else gather or dense at decode sizes, and
  ragged_dot on TPU, host on CPU, tiled elsewhere beyond."""
  if impl not in IMPLS:
    raise ValueError(f'gmm impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    backend = backend or jax.default_backend()
    if backend == 'cpu' and native and cpu_kernels.usable():
      return 'native'
    if x * k < n_experts:
      return 'gather'
    if x <= DENSE_ROWS and (backend != 'cpu' or x * n_experts <= CPU_DENSE_WORK):
      return 'dense'
    return {'tpu': 'ragged_dot', 'cpu': 'host'}.get(backend, 'tiled')
  return impl


def tile_rows(m: int, g: int) -> int:
  """Power of two <= M / (2 G), clipped to [128, 256]: padding stays under max(M / 2, 128 G) rows. (Measured
  on XLA:CPU: 128- and 256-row tiles run the batched matmul near dense speed, 32-64-row ones 2-5x slower.)"""
  target = max(m // (2 * g), 1)
  return int(min(max(1 << (target.bit_length() - 1), 128), 256))


class Dispatch(NamedTuple):
  """Where each routed copy goes. ragged_dot, host: slot_M = rank in expert-sorted order; tiled: padded slot;
  dense: the copy's candidate."""
  impl: str
  n_tokens: int
  source_U: jax.Array | None  # token feeding each dispatched row (n_tokens: a padding row of zeros)
  slot_M: jax.Array  # row of the dispatched layout holding copy m = x * K + k
  group_sizes_E: jax.Array  # copies per expert
  tile_expert: jax.Array | None  # tiled: the expert of each tile; gather: the expert of each row
  candidates_C: jax.Array | None = None  # dense: the experts read (None: all of them, in order)


def plan(experts_XK, n_experts: int, impl: str = 'auto') -> Dispatch:
  """Expert ids >= n_experts mark copies computed elsewhere (expert parallelism): they get no row, and
  `combine` must be given a zero gate weight for them."""
  x, k = experts_XK.shape
  m = x * k
  impl = resolve(impl, x, k, n_experts, native=False)
  if impl == 'native':
    raise ValueError("gmm impl 'native' is one fused kernel for the whole expert SwiGLU (cpu_kernels.py, called "
                     'by moe.RoutedExperts); it has no dispatch layout to plan')
  flat_M = experts_XK.reshape(-1)
  if impl == 'dense':
    return _dense_plan(flat_M, x, n_experts)
  if impl == 'gather':  # copies stay in token order; each row fetches its own expert's weight
    rank_M = jnp.arange(m, dtype=jnp.int32)
    return Dispatch(impl, x, rank_M // k, rank_M, jnp.zeros((n_experts,), jnp.int32), flat_M.astype(jnp.int32))
  order_M = jnp.argsort(flat_M, stable=True)  # copies grouped by expert
  group_sizes_E = jnp.bincount(flat_M, length=n_experts).astype(jnp.int32)
  rank_M = jnp.arange(m, dtype=jnp.int32)
  if impl in ('ragged_dot', 'host'):
    slot_M = jnp.zeros_like(rank_M).at[order_M].set(rank_M)
    return Dispatch(impl, x, (order_M // k).astype(jnp.int32), slot_M, group_sizes_E, None)
  tile = tile_rows(m, n_experts)
  tiles_E = (group_sizes_E + tile - 1) // tile
  start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  padded_start_E = (jnp.cumsum(tiles_E) - tiles_E) * tile
  sorted_expert_M = flat_M[order_M]
  n_tiles = -(-m // tile) + n_experts  # static bound: sum_e ceil(size_e / tile) <= ceil(M / tile) + E
  sorted_slot_M = jnp.where(sorted_expert_M < n_experts,  # copies for other devices' experts: out of range
                            rank_M - start_E[sorted_expert_M] + padded_start_E[sorted_expert_M], n_tiles * tile)
  source_U = jnp.full((n_tiles * tile,), x, jnp.int32).at[sorted_slot_M].set((order_M // k).astype(jnp.int32),
                                                                              mode='drop')
  slot_M = jnp.zeros_like(rank_M).at[order_M].set(sorted_slot_M)
  # Tiles past the last expert hold zero rows; they borrow the last expert's weight and are never read.
  tile_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles_E), jnp.arange(n_tiles), side='right'),
                             n_experts - 1).astype(jnp.int32)
  return Dispatch(impl, x, source_U, slot_M, group_sizes_E, tile_expert)


def _dense_plan(flat_M, x: int, n_experts: int) -> Dispatch:
  """Candidates: every expert when the copies could touch them all, else the distinct ones chosen (sorted,
  padded with n_experts: a slot no copy maps to, whose weight read is the last expert's)."""
  m = flat_M.shape[0]
  valid_M = flat_M < n_experts  # ids >= n_experts: copies computed on another device
  sizes_E = jnp.zeros((n_experts,), jnp.int32)
  if m >= n_experts:
    return Dispatch('dense', x, None, jnp.where(valid_M, flat_M, n_experts).astype(jnp.int32), sizes_E, None)
  candidates_C = jnp.unique(jnp.minimum(flat_M, n_experts), size=m, fill_value=n_experts)
  slot_M = jnp.where(valid_M, jnp.searchsorted(candidates_C, flat_M), m)
  return Dispatch('dense', x, None, slot_M.astype(jnp.int32), sizes_E, None, candidates_C.astype(jnp.int32))


def gather(d: Dispatch, x_XD):
  """Token rows in the dispatched layout [U, D] (padding rows are zero); dense: every token per candidate
  [C, X, D]."""
  if d.impl == 'dense':
    c = d.candidates_C.shape[0] if d.candidates_C is not None else d.group_sizes_E.shape[0]
    return jnp.broadcast_to(x_XD, (c,) + x_XD.shape)
  padded_XD = jnp.concatenate([x_XD, jnp.zeros((1, x_XD.shape[1]), x_XD.dtype)])
  return padded_XD[d.source_U]


def read(d: Dispatch, stack_E):
  """The part of an expert stack [E, ...] (a weight, or held codes or scales) that the layout multiplies:
  gather: one entry per row [M, ...]; dense: the candidates [C, ...]; otherwise the whole stack."""
  if d.impl == 'gather':
    return stack_E[d.tile_expert]
  if d.impl == 'dense' and d.candidates_C is not None:
    return stack_E[jnp.minimum(d.candidates_C, stack_E.shape[0] - 1)]
  return stack_E


def matmul(d: Dispatch, rows_UA, w_read, recipe=None):
  """rows of expert e times w[e], given the weights `read(d, w_EAO)`; with an FP8 recipe (tiled layout only)
  through the FP8 grouped GEMMs."""
  if recipe is not None:
    if d.impl != 'tiled':
      raise ValueError('the FP8 expert GEMMs need the tiled dispatch layout')
    return fp8_grouped_linear(rows_UA, w_read, d.tile_expert, recipe)
  if d.impl == 'ragged_dot':
    return jax.lax.ragged_dot(rows_UA, w_read, d.group_sizes_E)
  if d.impl == 'host':
    return host_gmm.matmul(rows_UA, (w_read,), d.group_sizes_E)[0]
  if d.impl == 'gather':
    return jnp.einsum('ma,mao->mo', rows_UA, w_read)
  if d.impl == 'dense':  # one batched GEMM over the candidates: no weight is copied or transposed
    return jnp.einsum('cxa,cao->cxo', rows_UA, w_read)
  return tiled_matmul(rows_UA, w_read, d.tile_expert)


def matmuls(d: Dispatch, rows_UA, ws_read, recipe=None) -> tuple[jax.Array, ...]:
  """`matmul` of the same rows by several weights (SwiGLU's w1 and w3): the host layout takes the rows to
  the host once for all of them."""
  if d.impl == 'host' and recipe is None:
    return host_gmm.matmul(rows_UA, tuple(ws_read), d.group_sizes_E)
  return tuple(matmul(d, rows_UA, w, recipe) for w in ws_read)


def matmul4(d: Dispatch, rows_UA, codes_EPO, scales_EGO, fmt: str, impl: str):
  """matmul for the decode layouts ('dense', 'gather') against a whole expert stack held as packed 4-bit codes
  (quant4.py), through pallas_kernels.quant4_gemm: the kernel fetches each block's expert from the stack
  itself, so no gathered copy of the weights is made (fp32 out)."""
  from pallas_kernels import quant4_gemm
  n_experts = codes_EPO.shape[0]
  if d.impl == 'gather':  # one row per copy, its own expert
    return quant4_gemm.gemm(rows_UA[:, None], codes_EPO, scales_EGO, d.tile_expert, fmt, impl)[:, 0]
  if d.impl != 'dense':
    raise ValueError(f"4-bit expert kernels take the 'dense' or 'gather' layouts, not {d.impl!r}")
  experts_C = (jnp.arange(n_experts, dtype=jnp.int32) if d.candidates_C is None
               else jnp.minimum(d.candidates_C, n_experts - 1))
  return quant4_gemm.gemm(rows_UA, codes_EPO, scales_EGO, experts_C, fmt, impl)


def combine(d: Dispatch, rows_UD, weights_XK):
  """sum_k weights[x, k] * output row of copy (x, k)."""
  x, k = weights_XK.shape
  if d.impl == 'dense':  # each token's gate weight per candidate: zero where it did not choose it
    gates_XC = jnp.zeros((x, rows_UD.shape[0]), rows_UD.dtype).at[jnp.arange(x * k) // k, d.slot_M].add(
        weights_XK.reshape(-1).astype(rows_UD.dtype), mode='drop')
    return jnp.einsum('cxd,xc->xd', rows_UD, gates_XC)
  outputs_XKD = rows_UD.at[d.slot_M].get(mode='fill', fill_value=0).reshape(x, k, -1)  # copies sent elsewhere: 0
  return jnp.einsum('xkd,xk->xd', outputs_XKD, weights_XK.astype(rows_UD.dtype))


@jax.custom_vjp
def tiled_matmul(rows_UA, w_EAO, tile_expert):
  n_tiles = tile_expert.shape[0]
  tiles_YZA = rows_UA.reshape(n_tiles, -1, rows_UA.shape[-1])
  return jnp.einsum('yza,yao->yzo', tiles_YZA, w_EAO[tile_expert]).reshape(rows_UA.shape[0], -1)


def _tiled_fwd(rows_UA, w_EAO, tile_expert):
  return tiled_matmul(rows_UA, w_EAO, tile_expert), (rows_UA, w_EAO, tile_expert)


def _tiled_bwd(residuals, d_rows_UO):
  rows_UA, w_EAO, tile_expert = residuals
  n_tiles = tile_expert.shape[0]
  tiles_YZA = rows_UA.reshape(n_tiles, -1, rows_UA.shape[-1])
  d_tiles_YZO = d_rows_UO.reshape(n_tiles, -1, d_rows_UO.shape[-1])
  d_rows_UA = jnp.einsum('yzo,yao->yza', d_tiles_YZO, w_EAO[tile_expert]).reshape(rows_UA.shape)
  d_w_YAO = jnp.einsum('yza,yzo->yao', tiles_YZA, d_tiles_YZO)
  d_w_EAO = jax.ops.segment_sum(d_w_YAO, tile_expert, num_segments=w_EAO.shape[0], indices_are_sorted=True)
  return d_rows_UA, d_w_EAO.astype(w_EAO.dtype), None


tiled_matmul.defvjp(_tiled_fwd, _tiled_bwd)


def reference_matmul(rows_MA, w_EAO, group_sizes_E):
  """The obviously-correct definition on expert-sorted rows (a masked loop over experts)."""
  ends_E = jnp.cumsum(group_sizes_E)
  starts_E = ends_E - group_sizes_E
  index_M = jnp.arange(rows_MA.shape[0])
  out = jnp.zeros((rows_MA.shape[0], w_EAO.shape[-1]), jnp.result_type(rows_MA, w_EAO))
  for e in range(w_EAO.shape[0]):
    mine = (index_M >= starts_E[e]) & (index_M < ends_E[e])
    out = jnp.where(mine[:, None], rows_MA @ w_EAO[e], out)
  return out
