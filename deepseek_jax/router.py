"""DeepSeekMoE gate: fp32 scores, group-limited top-k, aux-loss-free bias (spec §3.2-3.4).

`route` is the reference algorithm of the official `Gate.forward` (DeepSeek-V3 @ 9b4e978):
  1. scores = sigmoid or softmax of the fp32 router logits (kept unbiased for the weights);
  2. selection scores = scores + bias (bias steers selection only);
  3. with groups: group score = sum of the top-2 selection scores (sigmoid) or their max (softmax); keep the
     n_limited_groups best groups and mask the others with -inf (not 0.0, which older HF versions used);
  4. top-k experts on the masked selection scores;
  5. weights = UNBIASED scores of those experts, renormalised (norm_topk_prob), times route_scale.
The official code keys the group score on whether a bias exists rather than on score_func; the two rules
agree for every released config (sigmoid+bias for V3, softmax without bias for V2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import normal_param


class RouterBias(nnx.Variable):
  """The correction bias b_i: not a Param, so optimizers and weight decay never see it (spec §3.3)."""


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
  n, e = select_XE.shape
  g = cfg.n_expert_groups
  if g > 1:
    grouped_XGe = select_XE.reshape(n, g, e // g)  # e = experts per group
    if cfg.score_func == 'sigmoid':
      group_XG = jax.lax.top_k(grouped_XGe, 2)[0].sum(axis=-1)
    else:
      group_XG = grouped_XGe.max(axis=-1)
    _, kept = jax.lax.top_k(group_XG, cfg.n_limited_groups)
    keep_XG = jax.nn.one_hot(kept, g, dtype=jnp.bool_).any(axis=1)
    select_XE = jnp.where(keep_XG[:, :, None], grouped_XGe, -jnp.inf).reshape(n, e)
  _, experts_XK = jax.lax.top_k(select_XE, cfg.n_activated_experts)
  weights_XK = jnp.take_along_axis(scores_XE, experts_XK, axis=-1)
  if cfg.renormalize_topk:
    weights_XK = weights_XK / weights_XK.sum(axis=-1, keepdims=True)
  return Routing(weights_XK * cfg.route_scale, experts_XK.astype(jnp.int32), scores_XE)


class Gate(nnx.Module):
  """Router weight [dim, E] (checkpoint `gate.weight` transposed) and optional RouterBias [E], both used in fp32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.weight = normal_param(rngs, (cfg.dim, cfg.n_routed_experts), ('embed', 'router'), cfg)
    self.bias = (RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32), logical_axes=('router',))
                 if cfg.router_bias else None)

  def __call__(self, x_XD) -> Routing:
    # HIGHEST: a true fp32 product on TPU too, where default f32 matmuls round inputs to bf16.
    logits_XE = jnp.dot(x_XD.astype(jnp.float32), self.weight[...].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return route(logits_XE, None if self.bias is None else self.bias[...], self.cfg)
