"""DeepSeekMoE layer: shared experts + fine-grained routed experts, dropless (spec §3.1, Eq. 12).

h' = shared_experts(u) + sum_k g_k * expert_{e_k}(u). Routed experts run on expert-sorted token copies
through grouped matmuls (`grouped_matmul.gmm`), so the work grows with tokens x top-k and no expert ever sees
a token it was not chosen for; nothing is dropped. The layer also returns what training needs from it
(`MoEStats`): per-expert token counts for the bias update and the inputs of the sequence-wise balance loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import grouped_matmul as gm
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import MLP, normal_param
from deepseek_jax.router import Gate, Routing


class MoEStats(NamedTuple):
  """Routing statistics of one MoE layer call."""
  counts_E: jax.Array  # int32 tokens routed to each expert over the whole batch (bias update, spec §3.3)
  load_BE: jax.Array  # f_i per sequence: (E / (K T)) * tokens of the sequence routed to expert i (Eq. 18)
  prob_BE: jax.Array  # P_i per sequence: mean over tokens of s_i / sum_j s_j (Eq. 19-20)


class RoutedExperts(nnx.Module):
  """E SwiGLU experts stacked as w1, w3 [E, dim, moe_inter_dim] and w2 [E, moe_inter_dim, dim]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    self.dtype = cfg.jnp_dtype
    self.gmm_impl = cfg.gmm_impl
    self.w1 = normal_param(rngs, (e, d, i), ('expert', 'embed', 'moe_mlp'), cfg)
    self.w2 = normal_param(rngs, (e, i, d), ('expert', 'moe_mlp', 'embed'), cfg)
    self.w3 = normal_param(rngs, (e, d, i), ('expert', 'embed', 'moe_mlp'), cfg)

  def __call__(self, x_XD, experts_XK, weights_XK):
    dispatch = gm.plan(experts_XK, self.w1.shape[0], self.gmm_impl)
    rows_UD = gm.gather(dispatch, x_XD.astype(self.dtype))
    w1, w2, w3 = (w[...].astype(self.dtype) for w in (self.w1, self.w2, self.w3))
    h_UI = jax.nn.silu(gm.matmul(dispatch, rows_UD, w1)) * gm.matmul(dispatch, rows_UD, w3)
    return gm.combine(dispatch, gm.matmul(dispatch, h_UI, w2), weights_XK)


class MoE(nnx.Module):
  """Gate + routed experts + shared experts (official names `gate`, `experts`, `shared_experts`)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.gate = Gate(cfg, rngs)
    self.experts = RoutedExperts(cfg, rngs)
    self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, cfg, rngs, hidden_axis='moe_mlp')
                           if cfg.n_shared_experts else None)

  def __call__(self, x_BTD) -> tuple[jax.Array, MoEStats]:
    b, t, d = x_BTD.shape
    x_XD = x_BTD.reshape(b * t, d)
    routing = self.gate(x_XD)
    y_XD = self.experts(x_XD, routing.experts_XK, routing.weights_XK)
    if self.shared_experts is not None:
      y_XD = y_XD + self.shared_experts(x_XD)
    return y_XD.reshape(b, t, d), balance_stats(routing, b, t)


def balance_stats(routing: Routing, batch: int, seq_len: int) -> MoEStats:
  """Expert counts and the per-sequence f_i, P_i of the complementary balance loss (spec §3.4).

  f_i counts the experts actually chosen (with the bias), the reading of Eq. 18's indicator that matches
  what routing did; P_i carries the gradient, f_i has none.
  """
  n, k = routing.experts_XK.shape
  e = routing.scores_XE.shape[-1]
  seq_XK = jnp.broadcast_to((jnp.arange(n) // seq_len)[:, None], (n, k))
  chosen_BE = jnp.zeros((batch, e), jnp.float32).at[seq_XK, routing.experts_XK].add(1.0)
  load_BE = chosen_BE * (e / (k * seq_len))
  normalized_XE = routing.scores_XE / routing.scores_XE.sum(axis=-1, keepdims=True)
  prob_BE = normalized_XE.reshape(batch, seq_len, e).mean(axis=1)
  return MoEStats(chosen_BE.sum(axis=0).astype(jnp.int32), load_BE, prob_BE)
