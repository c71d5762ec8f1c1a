"""AdamW as DeepSeek-V3 trains it (paper §4.2, §3.3.3): beta (0.9, 0.95), weight decay 0.1, global-norm clip 1.0,
fp32 master weights and BF16 first and second moments.

The transformation returns the update *before* the learning rate, which the train step applies from the
token-based schedule: params <- params - lr * (adam + wd * params). Only `nnx.Param`s are optimized; the
router bias is a separate Variable type, so neither the moments nor the weight decay can reach it. Norm
scales are not decayed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype=jnp.bfloat16) -> optax.GradientTransformation:
  """Bias-corrected Adam direction with both moments stored in `moment_dtype` and computed in fp32."""

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
    return ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * g * g, state.nu, grads)
    c1, c2 = 1 - b1**count, 1 - b2**count
    updates = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
    cast = lambda tree: jax.tree.map(lambda x: x.astype(moment_dtype), tree)
    return updates, ScaleByAdamState(count, cast(mu), cast(nu))

  return optax.GradientTransformation(init, update)


def decay_mask(params):
  """True for every weight matrix / table; False for norm scales (parameter name 'scale')."""

  def decayed(path, _):
    names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return names[-1] != 'scale'

  return jax.tree_util.tree_map_with_path(decayed, params)


def adamw(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1, clip_norm: float = 1.0,
          moment_dtype=jnp.bfloat16) -> optax.GradientTransformation:
  """clip -> Adam (low-precision moments) -> + weight_decay * param (masked); multiply by -lr afterwards."""
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      scale_by_adam(b1, b2, eps, moment_dtype),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
  )
