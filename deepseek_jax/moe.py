"""DeepSeekMoE layer: shared experts + fine-grained routed experts, dropless (paper §2.1.2, Eq. 12-16).

h' = shared_experts(u) + sum_k g_k * expert_{e_k}(u). Routed experts run on expert-sorted token copies
through grouped matmuls (`grouped_matmul.matmul`), so the work grows with tokens x top-k and no expert ever sees
a token it was not chosen for; nothing is dropped. The layer also returns what training needs from it
(`MoEStats`): per-expert token counts for the bias update and the inputs of the sequence-wise balance loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import cpu_kernels, expert_parallel, quant4
from deepseek_jax import grouped_matmul as gm
from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.layers import MLP, dequantize_weight, fp8_recipe, fp8_weight, normal_param, quant4_weight
from deepseek_jax.router import Gate, Routing
from pallas_kernels.common import resolve_impl


class MoEStats(NamedTuple):
  """Routing statistics of one MoE layer call."""
  counts_E: jax.Array  # int32 tokens routed to each expert over the whole batch (the bias update, paper §2.1.2)
  load_BE: jax.Array  # f_i per sequence: (E / (K T)) * tokens of the sequence routed to expert i (Eq. 18)
  prob_BE: jax.Array  # P_i per sequence: mean over tokens of s_i / sum_j s_j (Eq. 19-20)


class RoutedExperts(nnx.Module):
  """E SwiGLU experts stacked as w1, w3 [E, dim, moe_inter_dim] and w2 [E, moe_inter_dim, dim]; held
  quantized for inference (rt.fp8_weights, rt.weights4) as codes w1 ... and scales w1_scale ..."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    self.dtype = rt.jnp_dtype
    self.recipe = fp8_recipe(rt)
    # FP8 quantizes 128-row tiles: the tiled layout keeps every expert's rows in whole tiles.
    self.gmm_impl = 'tiled' if self.recipe is not None else rt.gmm_impl
    self.ep_dispatch = rt.ep_dispatch
    self.weights4_impl = resolve_impl(rt.weights4_impl)
    self.shapes = (('w1', (e, d, i)), ('w2', (e, i, d)), ('w3', (e, d, i)))  # static attributes stay hashable
    axes = {'w1': ('expert', 'embed', 'moe_mlp'), 'w2': ('expert', 'moe_mlp', 'embed'),
            'w3': ('expert', 'embed', 'moe_mlp')}
    # 4-bit experts take precedence over FP8 (the usual mix: FP8 projections, 4-bit routed experts).
    self.held = rt.weights4 if rt.weights4 != 'none' else ('fp8' if rt.fp8_weights else None)
    for name, shape in self.shapes:
      if self.held == 'fp8':
        codes, scales = fp8_weight(rngs, shape, axes[name], cfg, rt)
      elif self.held:
        codes, scales = quant4_weight(rngs, shape, axes[name], cfg, rt)
      else:
        setattr(self, name, normal_param(rngs, shape, axes[name], cfg, rt))
        continue
      setattr(self, name, codes)
      setattr(self, name + '_scale', scales)

  def stored(self) -> tuple[jax.Array, ...]:
    """The expert stacks as held, expert dimension first: (w1, w2, w3), or each weight's codes then scales."""
    names = [n for n, _ in self.shapes]
    if self.held:
      names = [x for n in names for x in (n, n + '_scale')]
    return tuple(getattr(self, n)[...] for n in names)

  def _weights(self, dispatch: gm.Dispatch, stored) -> list[jax.Array]:
    """(w1, w2, w3) as the matmuls take them, from only the experts the dispatch reads (gm.read): so a decode
    step reads the held codes of the experts it uses, not a dequantized copy of all E. FP8 master weights
    stay raw under the FP8 recipe (it quantizes them itself); the rest in the compute dtype."""
    per = 2 if self.held else 1
    out = []
    for j, (_, shape) in enumerate(self.shapes):
      read = [gm.read(dispatch, a) for a in stored[per * j:per * (j + 1)]]
      if self.held == 'fp8':
        # Re-quantizing a dequantized FP8 weight in the FP8 path gives back the same codes and scales.
        out.append(dequantize_weight(*read, shape, jnp.float32 if self.recipe is not None else self.dtype))
      elif self.held:
        out.append(quant4.dequantize(quant4.Packed(*read), self.held, self.dtype))
      else:
        out.append(read[0] if self.recipe is not None else read[0].astype(self.dtype))
    return out

  def __call__(self, x_XD, experts_XK, weights_XK):
    stored = self.stored()
    mesh = expert_parallel.expert_mesh(x_XD.shape[0])
    if mesh is not None:  # experts spread over the mesh's 'expert' axis
      return expert_parallel.routed(self._apply, mesh, x_XD, experts_XK, weights_XK, stored, self.ep_dispatch)
    return self._apply(x_XD, experts_XK, weights_XK, stored, self.shapes[0][1][0])

  def _apply(self, x_XD, experts_XK, weights_XK, stored, n_experts: int, impl: str | None = None):
    impl = impl or gm.resolve(self.gmm_impl, *experts_XK.shape, n_experts, native=self.held is None)
    if impl == 'native':  # one CPU kernel for the whole SwiGLU; a gradient goes through the exact host layout
      reference = lambda x, e, g, *ws: self._apply(x, e, g, ws, n_experts, 'host')
      return cpu_kernels.routed_swiglu(x_XD, experts_XK, weights_XK, *stored, reference).astype(self.dtype)
    dispatch = gm.plan(experts_XK, n_experts, impl)
    rows_UD = gm.gather(dispatch, x_XD.astype(self.dtype))
    if self.held in quant4.FORMATS and dispatch.impl in ('dense', 'gather') and self.weights4_impl != 'xla':
      # Decoding on TPU: the 4-bit kernel dequantizes in its operand fetch, from the stacks as stored.
      def matmul(rows, j):
        return gm.matmul4(dispatch, rows, *stored[2 * j:2 * j + 2], self.held, self.weights4_impl).astype(self.dtype)
      h_UI = jax.nn.silu(matmul(rows_UD, 0)) * matmul(rows_UD, 2)
      return gm.combine(dispatch, matmul(h_UI, 1), weights_XK)
    w1, w2, w3 = self._weights(dispatch, stored)
    gate_UI, up_UI = gm.matmuls(dispatch, rows_UD, (w1, w3), self.recipe)
    h_UI = jax.nn.silu(gate_UI) * up_UI
    return gm.combine(dispatch, gm.matmul(dispatch, h_UI, w2, self.recipe), weights_XK)


class MoE(nnx.Module):
  """Gate + routed experts + shared experts (official names `gate`, `experts`, `shared_experts`)."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    self.gate = Gate(cfg, rt, rngs)
    self.experts = RoutedExperts(cfg, rt, rngs)
    self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, cfg, rt, rngs,
                               hidden_axis='moe_mlp') if cfg.n_shared_experts else None)

  def __call__(self, x_BTD) -> tuple[jax.Array, MoEStats]:
    b, t, d = x_BTD.shape
    x_XD = x_BTD.reshape(b * t, d)
    routing = self.gate(x_XD)
    y_XD = self.experts(x_XD, routing.experts_XK, routing.weights_XK)
    if self.shared_experts is not None:
      y_XD = y_XD + self.shared_experts(x_XD)
    return y_XD.reshape(b, t, d), balance_stats(routing, b, t)


def balance_stats(routing: Routing, batch: int, seq_len: int) -> MoEStats:
  """Expert counts and the per-sequence f_i, P_i of the complementary balance loss (paper Eq. 17-20).

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
