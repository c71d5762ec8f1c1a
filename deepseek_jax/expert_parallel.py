"""Expert parallelism: the routed experts under `jax.shard_map` over the mesh's 'expert' axis (spec §3.4).

Each of the ep devices along 'expert' holds E / ep routed experts (sharding.RULES) and a 1 / ep share of the
tokens. The dispatch is dropless with static shapes, in the all-gather / reduce-scatter form:
  1. all-gather the tokens, their top-k experts and gate weights over 'expert' (ep * X tokens);
  2. every device runs the copies routed to ITS experts through the grouped matmuls (copies for other
     devices' experts get no row and a zero gate weight);
  3. reduce-scatter the partial outputs over 'expert': each token's K expert outputs sum back on its device.
The result equals the single-device layer up to the order of that sum. Per device and layer this moves
2 (ep - 1) X D values where an all-to-all moves 2 X K (ep - 1) / ep D: less while ep < K (V3: K = 8), more on
wide expert meshes, where a ragged all-to-all belongs (not built here: XLA:CPU has none to test it on).
The grouped-matmul buffer is sized for the worst case (every copy routed here), as dropless static shapes
require; `ragged_dot` on TPU computes only the rows that arrived, the tiled CPU path computes all.

The gate, the expert counts and the balance statistics stay outside, in the global view of the batch, so the
counts for the bias update are reduced over the whole global batch by the partitioner.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

TOKEN_AXES = ('data', 'expert')  # sharding.RULES['batch']: how flattened tokens are split


def expert_mesh(n_tokens: int):
  """The ambient mesh (jax.set_mesh) when it spreads experts over more than one device and the tokens split
  evenly over its batch axes (or are already per-device: inside pipeline.py's shard_map), else None (single
  device, decoding, uneven evaluation batches)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'expert' not in mesh.axis_names or mesh.shape['expert'] == 1:
    return None
  if 'expert' not in mesh.manual_axes and n_tokens % math.prod(mesh.shape[a] for a in TOKEN_AXES):
    return None
  return mesh


def routed(apply_fn: Callable, mesh, x_XD, experts_XK, weights_XK, expert_weights):
  """sum_k weights[x, k] * expert_{experts[x, k]}(x) with the experts spread over mesh axis 'expert'.

  apply_fn(x_XD, local_experts_XK, weights_XK, expert_weights, n_local) is the single-device computation
  over n_local experts, given local expert ids (n_local for copies routed elsewhere) and their weights.
  expert_weights: arrays with the expert dimension first, sharded over 'expert' (inside a shard_map manual
  over 'expert': this device's experts).
  """
  ep = mesh.shape['expert']
  n_local = expert_weights[0].shape[0] // (1 if 'expert' in mesh.manual_axes else ep)

  def local(x_XD, experts_XK, weights_XK, *weights):
    gather = lambda a: jax.lax.all_gather(a, 'expert', tiled=True)
    x_XD, experts_XK, weights_XK = gather(x_XD), gather(experts_XK), gather(weights_XK)
    first = jax.lax.axis_index('expert') * n_local
    mine_XK = (experts_XK >= first) & (experts_XK < first + n_local)
    local_XK = jnp.where(mine_XK, experts_XK - first, n_local)
    y_XD = apply_fn(x_XD, local_XK, jnp.where(mine_XK, weights_XK, 0), weights, n_local)
    return jax.lax.psum_scatter(y_XD, 'expert', scatter_dimension=0, tiled=True)

  if 'expert' in mesh.manual_axes:  # inside a shard_map already (pipeline.py): tokens and weights are local
    return local(x_XD, experts_XK, weights_XK, *expert_weights)
  tokens = P(TOKEN_AXES)
  return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens) + (P('expert'),) * len(expert_weights),
                       out_specs=tokens, axis_names=set(TOKEN_AXES), check_vma=False)(x_XD, experts_XK, weights_XK, *expert_weights)
