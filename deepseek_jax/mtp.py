"""Multi-Token Prediction module (paper §2.2, Eq. 21-25, in the form the released checkpoint expects).

Depth k at position i combines the previous depth's representation h_i with the embedding of token i+k:
  x = eh_proj(concat[enorm(Emb(t_{i+k})), hnorm(h_i)])      (embedding FIRST, as the released eh_proj expects)
  h'_i = shared_head_norm(Block(x))                          (the checkpoint's `shared_head.norm`)
  logits = OutHead(h'_i), predicting t_{i+k+1}.
h for depth 1 is the main model's final-normed hidden state, the tensor HF transformers, vLLM and SGLang feed
their MTP layers when serving the released weights. The embedding and output head are the main model's,
passed in as call arguments so the module graph stays a tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.block import Block
from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.layers import Embed, Linear, RMSNorm
from deepseek_jax.moe import MoEStats


class MTP(nnx.Module):
  """One MTP depth: enorm, hnorm, eh_proj, a full block (layer id n_layers + k) and its head norm."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, depth: int, rngs: nnx.Rngs):
    self.enorm = RMSNorm(cfg.dim, cfg, rt)
    self.hnorm = RMSNorm(cfg.dim, cfg, rt)
    self.eh_proj = Linear(2 * cfg.dim, cfg.dim, ('mtp_concat', 'embed'), cfg, rt, rngs)
    self.block = Block(cfg, rt, cfg.n_layers + depth, rngs)
    self.shared_head_norm = RMSNorm(cfg.dim, cfg, rt)

  def __call__(self, h_BTD, next_tokens_BT, positions_BT, embed: Embed, head: Linear,
               cache=None) -> tuple[jax.Array, jax.Array, MoEStats | None, object]:
    """(normalised representation for the next depth, logits [B, T, vocab], block MoE stats, block cache)."""
    eh = jnp.concatenate([self.enorm(embed(next_tokens_BT)), self.hnorm(h_BTD)], axis=-1)  # [B, T, 2D]
    x_BTD, stats, cache = self.block(self.eh_proj(eh), positions_BT, cache)
    h_BTD = self.shared_head_norm(x_BTD)
    return h_BTD, head(h_BTD), stats, cache
