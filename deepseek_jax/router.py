"""DeepSeekMoE gate: fp32 scores, group-limited top-k, aux-loss-free bias and its update (paper §2.1.2).

`route` is the reference algorithm of the official `Gate.forward` (inference/model.py, DeepSeek-V3 @ 9b4e978):
  1. scores = sigmoid or softmax of the fp32 router logits (kept unbiased for the weights);
  2. selection scores = scores + bias (bias steers selection only);
  3. with groups: group score = sum of the top-2 selection scores when the gate has a bias, their max when it
     has none (the official rule keys on the bias, not on score_func); keep the n_limited_groups best groups
     and mask the others with -inf (not 0.0, which older HF versions used);
  4. top-k experts on the masked selection scores;
  5. weights = UNBIASED scores of those experts, renormalised (norm_topk_prob), times route_scale.
`update_router_bias` is the paper's sign rule, b_i <- b_i + gamma * sign(mean_j load_j - load_i), on the
tokens each MoE layer routed over the whole global batch, outside autodiff and the optimizer.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.layers import normal_param

BIAS_PATH = ('gate', 'bias')  # where an MoE layer holds its RouterBias (official name `gate.bias`)


class RouterBias(nnx.Variable):
  """The correction bias b_i: not a Param, so optimizers and weight decay never see it (paper §2.1.2)."""


class Routing(NamedTuple):
  weights_XK: jax.Array  # float32 gate values g_{i,t} of the chosen experts
  experts_XK: jax.Array  # int32 expert ids, each row distinct
  scores_XE: jax.Array  # float32 unbiased affinities s_{i,t}


def route(logits_XE, bias_E, cfg: ModelConfig) -> Routing:
  """Reference gate: logits [X, E] (+ optional bias [E]) -> top-k experts and their weights."""
  logits_XE = logits_XE.astype(jnp.float32)
  if cfg.score_func == 'sigmoid':
    scores_XE = jax.nn.sigmoid(logits_XE)
  else:
    scores_XE = jax.nn.softmax(logits_XE, axis=-1)
  select_XE = scores_XE if bias_E is None else scores_XE + bias_E.astype(jnp.float32)
  x, e = select_XE.shape
  g = cfg.n_expert_groups
  if g > 1:
    grouped_XGY = select_XE.reshape(x, g, e // g)  # Y: experts per group
    if bias_E is None:
      group_XG = grouped_XGY.max(axis=-1)
    else:
      group_XG = jax.lax.top_k(grouped_XGY, 2)[0].sum(axis=-1)
    _, kept = jax.lax.top_k(group_XG, cfg.n_limited_groups)
    keep_XG = jax.nn.one_hot(kept, g, dtype=jnp.bool_).any(axis=1)
    select_XE = jnp.where(keep_XG[:, :, None], grouped_XGY, -jnp.inf).reshape(x, e)
  _, experts_XK = jax.lax.top_k(select_XE, cfg.n_activated_experts)
  weights_XK = jnp.take_along_axis(scores_XE, experts_XK, axis=-1)
  if cfg.renormalize_topk:
    weights_XK = weights_XK / weights_XK.sum(axis=-1, keepdims=True)
  return Routing(weights_XK * cfg.route_scale, experts_XK.astype(jnp.int32), scores_XE)


class Gate(nnx.Module):
  """Router weight [dim, E] (checkpoint `gate.weight` transposed) and optional RouterBias [E], both used in fp32."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    self.cfg = cfg
    self.weight = normal_param(rngs, (cfg.dim, cfg.n_routed_experts), ('embed', 'router'), cfg, rt)
    self.bias = (RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=('router',))
                 if cfg.router_bias else None)

  def __call__(self, x_XD) -> Routing:
    # HIGHEST: a true fp32 product on TPU too, where default f32 matmuls round inputs to bf16.
    logits_XE = jnp.dot(x_XD.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return route(logits_XE, None if self.bias is None else self.bias[...], self.cfg)


def update_router_bias(bias: nnx.State, counts: Mapping[str, jax.Array], gamma) -> nnx.State:
  """The sign-rule step of every RouterBias. counts: tokens per expert keyed by the path of the MoE layer
  that routed them ('moe_layers/ffn' [L, E] for the stacked layers, 'mtp/0/block/ffn' [E]), as the model's
  outputs carry them; each bias at <layer path>/gate/bias takes its own layer's counts."""
  updated, used = [], set()
  for path, variable in nnx.to_flat_state(bias):
    layer = '/'.join(map(str, path[:-len(BIAS_PATH)]))
    if tuple(path[-len(BIAS_PATH):]) != BIAS_PATH or layer not in counts:
      raise ValueError(f'update_router_bias: no expert counts for the router bias at {"/".join(map(str, path))} '
                       f'(counts for: {sorted(counts)})')
    layer_counts = counts[layer].astype(jnp.float32)
    if layer_counts.shape != variable.shape:
      raise ValueError(f'update_router_bias: counts of {layer} have shape {layer_counts.shape}, its bias '
                       f'{variable.shape}')
    step = gamma * jnp.sign(layer_counts.mean(axis=-1, keepdims=True) - layer_counts)
    updated.append((path, variable.replace(variable[...] + step)))
    used.add(layer)
  if set(counts) - used:
    raise ValueError(f'update_router_bias: counts for {sorted(set(counts) - used)} have no router bias')
  return nnx.from_flat_state(updated)
