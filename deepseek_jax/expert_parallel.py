"""Expert parallelism: the routed experts under `jax.shard_map` over the mesh's 'expert' axis (paper §3.2.2).

Each of the ep devices along 'expert' holds E / ep routed experts (sharding.RULES) and a 1 / ep share of the
tokens. Two dropless dispatches with static shapes; both equal the single-device layer up to summation order:

'all_gather': all-gather the tokens, their top-k experts and gate weights over 'expert'; every device runs
  the copies routed to ITS experts (the others get no row and a zero gate weight); reduce-scatter the partial
  outputs back. Moves 2 (ep - 1) / ep X D values per device and layer (X: the device's tokens).
'all_to_all': each device sorts its X K routed copies by owning device and sends each its slice with a
  ragged all-to-all; the owner runs them through its experts and sends the rows back the same way; the gate
  weights are applied at home. Moves 2 K (ep - 1) / ep X D: cheaper once ep > K (V3: K = 8, EP64). The
  receive buffer holds ep X K rows, the worst case of every peer routing every copy here, as dropless
  static shapes require; `ragged_dot` on TPU computes only the rows that arrived.
'auto' takes all_to_all on TPU and GPU when ep > K, all_gather otherwise. XLA:CPU has no ragged all-to-all:
there the op is emulated exactly as its documentation specifies (an all-gather and masked copies), which is
how the tests run the all_to_all dispatch.

The gate, the expert counts and the balance statistics stay outside, in the global view of the batch, so the
counts for the bias update are reduced over the whole global batch by the partitioner.

Letters beyond model.py's key: Y the sending and Z the receiving device of an all-to-all (U: the rows a device
receives, its dispatched expert rows).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

DISPATCHES = ('auto', 'all_gather', 'all_to_all')
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


def check_divides(n_experts: int, mesh) -> None:
  """Each device along 'expert' must hold a whole, equal share of the routed experts."""
  ep = mesh.shape.get('expert', 1)
  if n_experts % ep:
    raise ValueError(f'n_routed_experts={n_experts} does not divide by the mesh\'s expert axis ({ep} devices): '
                     'choose mesh.expert among its divisors')


def resolve(dispatch: str, ep: int, top_k: int) -> str:
  if dispatch == 'auto':
    return 'all_to_all' if ep > top_k and jax.default_backend() in ('tpu', 'gpu') else 'all_gather'
  return dispatch


def routed(apply_fn: Callable, mesh, x_XD, experts_XK, weights_XK, expert_weights, dispatch: str = 'auto'):
  """sum_k weights[x, k] * expert_{experts[x, k]}(x) with the experts spread over mesh axis 'expert'.

  apply_fn(x_XD, local_experts_XK, weights_XK, expert_weights, n_local) is the single-device computation
  over n_local experts, given local expert ids (n_local for copies routed elsewhere) and their weights.
  expert_weights: arrays with the expert dimension first, sharded over 'expert' (inside a shard_map manual
  over 'expert': this device's experts).
  """
  ep = mesh.shape['expert']
  manual = 'expert' in mesh.manual_axes
  if not manual:
    check_divides(expert_weights[0].shape[0], mesh)
  n_local = expert_weights[0].shape[0] // (1 if manual else ep)
  local = _all_gather if resolve(dispatch, ep, experts_XK.shape[1]) == 'all_gather' else _all_to_all

  def run(x_XD, experts_XK, weights_XK, *weights):
    return local(apply_fn, n_local, ep, x_XD, experts_XK, weights_XK, weights)

  if manual:  # inside a shard_map already (pipeline.py): tokens and weights are this device's
    return run(x_XD, experts_XK, weights_XK, *expert_weights)
  tokens = P(TOKEN_AXES)
  return jax.shard_map(run, mesh=mesh, in_specs=(tokens, tokens, tokens) + (P('expert'),) * len(expert_weights),
                       out_specs=tokens, axis_names=set(TOKEN_AXES), check_vma=False,
                       )(x_XD, experts_XK, weights_XK, *expert_weights)


def _all_gather(apply_fn, n_local, ep, x_XD, experts_XK, weights_XK, weights):
  gather = lambda a: jax.lax.all_gather(a, 'expert', tiled=True)
  x_XD, experts_XK, weights_XK = gather(x_XD), gather(experts_XK), gather(weights_XK)
  first = jax.lax.axis_index('expert') * n_local
  mine_XK = (experts_XK >= first) & (experts_XK < first + n_local)
  local_XK = jnp.where(mine_XK, experts_XK - first, n_local)
  y_XD = apply_fn(x_XD, local_XK, jnp.where(mine_XK, weights_XK, 0), weights, n_local)
  return jax.lax.psum_scatter(y_XD, 'expert', scatter_dimension=0, tiled=True)


def _all_to_all(apply_fn, n_local, ep, x_XD, experts_XK, weights_XK, weights):
  x, k = experts_XK.shape
  m = x * k
  flat_M = experts_XK.reshape(-1)
  owner_M = flat_M // n_local
  order_M = jnp.argsort(owner_M, stable=True)  # copies grouped by the device that owns their expert
  send_sizes = jnp.bincount(owner_M, length=ep).astype(jnp.int32)
  send_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
  sizes_YZ = jax.lax.all_gather(send_sizes, 'expert')  # [sender, receiver] copy counts
  me = jax.lax.axis_index('expert')
  # Receiver r stores its slices by sender: mine starts after those of the senders before me.
  landing_YZ = (jnp.cumsum(sizes_YZ, axis=0) - sizes_YZ).astype(jnp.int32)
  recv_sizes = sizes_YZ[:, me]
  capacity = ep * m  # every peer may route every copy here
  rows_MD = x_XD[order_M // k]
  ids_M = (flat_M[order_M] % n_local).astype(jnp.int32)
  exchange = _ragged_all_to_all if jax.default_backend() in ('tpu', 'gpu') else _emulated_ragged_all_to_all
  rows_UD = exchange(rows_MD, jnp.zeros((capacity, x_XD.shape[1]), x_XD.dtype), send_offsets, send_sizes,
                     landing_YZ[me], recv_sizes)
  ids_U = exchange(ids_M, jnp.full((capacity,), n_local, jnp.int32), send_offsets, send_sizes, landing_YZ[me],
                   recv_sizes)  # rows no peer filled keep the "elsewhere" id: no expert runs them
  ones_U1 = jnp.ones((capacity, 1), x_XD.dtype)
  y_UD = apply_fn(rows_UD, ids_U[:, None], ones_U1, weights, n_local)
  # Back the same way: my received slices (at landing_YZ[:, me]) return to where each sender cut them.
  back_MD = exchange(y_UD, jnp.zeros((m, y_UD.shape[1]), y_UD.dtype), landing_YZ[:, me], recv_sizes,
                     (jnp.cumsum(sizes_YZ, axis=1) - sizes_YZ)[:, me].astype(jnp.int32), send_sizes)
  copies_XKD = jnp.zeros_like(back_MD).at[order_M].set(back_MD).reshape(x, k, -1)
  return jnp.einsum('xkd,xk->xd', copies_XKD, weights_XK.astype(copies_XKD.dtype))


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                   axis_name='expert')


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
  """`jax.lax.ragged_all_to_all` over 'expert' as its docstring specifies it, from an all-gather: sender s's
  slice [input_offsets_s[me], + send_sizes_s[me]) lands at output_offsets_s[me] here. (recv_sizes is
  implied: sender s's send_sizes_s[me].)"""
  del recv_sizes
  me = jax.lax.axis_index('expert')
  gather = lambda a: jax.lax.all_gather(a, 'expert')
  operands, starts, sizes, lands = gather(operand), gather(input_offsets)[:, me], gather(send_sizes)[:, me], \
      gather(output_offsets)[:, me]
  index = jnp.arange(output.shape[0])
  result = output
  for s in range(operands.shape[0]):
    inside = (index >= lands[s]) & (index < lands[s] + sizes[s])
    rows = operands[s][jnp.clip(index - lands[s] + starts[s], 0, operand.shape[0] - 1)]
    result = jnp.where(inside.reshape((-1,) + (1,) * (output.ndim - 1)), rows, result)
  return result
