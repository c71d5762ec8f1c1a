"""Decoder block and the running of a stack of identical blocks (paper §2, Figure 2; official `Block`).

Block: pre-norm residual `x += attn(attn_norm(x)); x += ffn(ffn_norm(x))`, with a dense SwiGLU FFN for layer
ids below n_dense_layers and a DeepSeekMoE FFN from there on (the MTP block at layer id n_layers is MoE too).

Identical blocks are stored stacked: every Variable gains a leading 'layers' axis, and `run_layers` runs them
with `jax.lax.scan`, so compile time does not grow with depth. A model can also hold its layers unstacked, as
a list of per-layer blocks (`unstack_blocks`; decoding an unrolled model on CPU, where XLA copies a layer's
slice out of every stacked weight at each step); `run_layers` loops over those.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.layers import MLP, RMSNorm
from deepseek_jax.mla import MLA
from deepseek_jax.moe import MoE, MoEStats

FFN = 'ffn'  # the block's FFN attribute: an MoE layer's path ends with it (router.update_router_bias)


class Block(nnx.Module):
  """One decoder layer with the official submodule names attn_norm, attn, ffn_norm, ffn."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, layer_id: int, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.dim, cfg, rt)
    self.attn = MLA(cfg, rt, rngs)
    self.ffn_norm = RMSNorm(cfg.dim, cfg, rt)
    self.is_moe = layer_id >= cfg.n_dense_layers
    self.ffn = MoE(cfg, rt, rngs) if self.is_moe else MLP(cfg.dim, cfg.inter_dim, cfg, rt, rngs)

  def __call__(self, x_BTD, positions_BT, cache=None) -> tuple[jax.Array, MoEStats | None, object]:
    """(output, MoE stats or None for a dense block, the attention cache with x's entries; None without)."""
    attn_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, cache)
    x_BTD = x_BTD + attn_BTD
    if self.is_moe:
      y_BTD, stats = self.ffn(self.ffn_norm(x_BTD))
    else:
      y_BTD, stats = self.ffn(self.ffn_norm(x_BTD)), None
    return x_BTD + y_BTD, stats, cache


def stack(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """n independently initialised copies of `make(rngs)` as ONE module whose Variables have a leading axis."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  keys = jax.random.split(rngs.params(), n)
  state = jax.vmap(lambda key: nnx.state(make(nnx.Rngs(key))))(keys)
  for _, variable in nnx.to_flat_state(state):
    variable.set_metadata('logical_axes', ('layers',) + tuple(variable.get_metadata('logical_axes')))
  return nnx.merge(graphdef, state)


def unstack_blocks(blocks: Block | None) -> nnx.List | None:
  """The inverse of `stack`: one Block per layer, holding copies of its slice of the stacked weights."""
  if blocks is None or isinstance(blocks, nnx.List):
    return blocks
  graphdef, state = nnx.split(blocks)
  return nnx.List([nnx.merge(graphdef, layer) for layer in _layer_slices(state, jax.tree.leaves(state)[0].shape[0])])


@functools.partial(jax.jit, static_argnums=1)
def _layer_slices(state, n: int):
  """The n per-layer slices of stacked arrays, in one compiled call (eager slicing costs ~15 ms per model)."""
  return tuple(jax.tree.map(lambda a: a[i], state) for i in range(n))


def run_layers(layers: Block | nnx.List, x_BTD, positions_BT, cache, rt: Runtime):
  """Applies the layers in order: (output, per-layer MoE stats stacked on axis 0 or None, the caches).

  Stacked layers (a Block with a leading layer axis) scan with their stacked cache ([L, ...]); unstacked ones
  (a list of Blocks) run one after the other, each with its own cache (a list). With rt.remat and no cache,
  only each block's input is kept for the backward pass (activation memory ~ one layer). rt.scan_layers False
  unrolls the scan, trading compile time (linear in depth) for speed on XLA:CPU, where a rolled loop stacks
  every layer's residuals into zero-initialised buffers (~15% of a small model's step there).
  """
  if isinstance(layers, nnx.List):
    caches = [None] * len(layers) if cache is None else cache
    stats, new_caches = [], []
    for block, layer_cache in zip(layers, caches):
      x_BTD, layer_stats, layer_cache = block(x_BTD, positions_BT, layer_cache)
      stats.append(layer_stats)
      new_caches.append(layer_cache)
    stacked = None if stats[0] is None else jax.tree.map(lambda *s: jnp.stack(s), *stats)
    return x_BTD, stacked, None if cache is None else new_caches
  graphdef, state = nnx.split(layers)

  def body(x_BTD, layer):
    layer_state, layer_cache = layer
    x_BTD, stats, layer_cache = nnx.merge(graphdef, layer_state)(x_BTD, positions_BT, layer_cache)
    return x_BTD, (stats, layer_cache)

  if rt.remat and cache is None:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  x_BTD, (stats, cache) = jax.lax.scan(body, x_BTD, (state, cache), unroll=not rt.scan_layers)
  return x_BTD, stats, cache
