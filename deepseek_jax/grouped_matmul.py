"""Grouped matmul for dropless MoE: rows sorted by expert, one weight matrix per expert.

gmm(x [M, P], w [G, P, O], group_sizes [G]) -> [M, O], where rows [start_g, start_g + size_g) use w[g].
Two XLA implementations, both with cost proportional to the routed rows M (tokens x top-k), not to G:
- 'ragged_dot': `jax.lax.ragged_dot`, a native grouped GEMM on TPU. On CPU XLA expands it into a dense
  masked product over all G groups (cost x G), so it is not used there.
- 'tiled': rows of each group are padded to a multiple of a tile, every tile gathers its group's weight and
  one batched matmul runs over tiles. Work = (M + G * tile) * P * O, with the tile chosen so that the G * tile
  padding stays below M / 4 (plus a tile floor of 8 rows).
'auto' takes ragged_dot on TPU and tiled elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.config import GMM_IMPLS as IMPLS


def gmm(x_MP, w_GPO, group_sizes_G, impl: str = 'auto'):
  """Grouped matmul of expert-sorted rows; group_sizes must sum to M."""
  if impl not in IMPLS:
    raise ValueError(f'gmm impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    impl = 'ragged_dot' if jax.default_backend() == 'tpu' else 'tiled'
  if impl == 'ragged_dot':
    return jax.lax.ragged_dot(x_MP, w_GPO, group_sizes_G)
  return gmm_tiled(x_MP, w_GPO, group_sizes_G, tile=tile_rows(x_MP.shape[0], w_GPO.shape[0]))


def tile_rows(m: int, g: int) -> int:
  """Largest power of two <= M / (4 G), clipped to [8, 128]: padding (G * tile) stays under M / 4."""
  target = max(m // (4 * g), 1)
  return int(min(max(1 << (target.bit_length() - 1), 8), 128))


@functools.partial(jax.jit, static_argnames='tile')
def gmm_tiled(x_MP, w_GPO, group_sizes_G, *, tile: int):
  m, p = x_MP.shape
  g, _, o = w_GPO.shape
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  tiles_G = (group_sizes_G + tile - 1) // tile
  start_G = jnp.cumsum(group_sizes_G) - group_sizes_G
  padded_start_G = (jnp.cumsum(tiles_G) - tiles_G) * tile
  group_M = jnp.repeat(jnp.arange(g), group_sizes_G, total_repeat_length=m)
  slot_M = jnp.arange(m) - start_G[group_M] + padded_start_G[group_M]
  n_tiles = -(-m // tile) + g  # static bound: sum_g ceil(size_g / tile) <= ceil(M / tile) + G
  x_padded = jnp.zeros((n_tiles * tile, p), x_MP.dtype).at[slot_M].set(x_MP)
  # Tiles past the last group hold zeros; they borrow the last group's weight and are never read back.
  tile_group_T = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles_G), jnp.arange(n_tiles), side='right'), g - 1)
  y_tiles = jnp.einsum('tbp,tpo->tbo', x_padded.reshape(n_tiles, tile, p), w_GPO[tile_group_T])
  return y_tiles.reshape(n_tiles * tile, o)[slot_M]


def gmm_reference(x_MP, w_GPO, group_sizes_G):
  """Loop over groups with masks: the obviously-correct (and G-times costlier) definition."""
  ends_G = jnp.cumsum(group_sizes_G)
  starts_G = ends_G - group_sizes_G
  rows_M = jnp.arange(x_MP.shape[0])
  out = jnp.zeros((x_MP.shape[0], w_GPO.shape[-1]), jnp.result_type(x_MP, w_GPO))
  for gi in range(w_GPO.shape[0]):
    in_group = (rows_M >= starts_G[gi]) & (rows_M < ends_G[gi])
    out = jnp.where(in_group[:, None], x_MP @ w_GPO[gi], out)
  return out
