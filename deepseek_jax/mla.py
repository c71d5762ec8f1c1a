"""Multi-head Latent Attention (spec §2.1-2.3), train / prefill path in MHA form.

Queries: `wq` (q_lora_rank == 0) or the low-rank `wq_a` -> `q_norm` -> `wq_b`. Keys and values come from a
compressed latent: `wkv_a` yields the latent c (kv_lora_rank) and ONE decoupled k_pe shared by every head;
`kv_norm(c)` is up-projected by `wkv_b` into per-head k_nope and v. Scores are
q_nope . k_nope + q_pe . k_pe, which equals attention over the concatenation [k_nope; k_pe] without
materialising the broadcast k_pe. Softmax in float32 (official `softmax(dtype=float32)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import Linear, RMSNorm
from deepseek_jax.rope import apply_rope


class MLA(nnx.Module):
  """Multi-head Latent Attention with the official parameter names."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    h, qk, c, r = cfg.n_heads, cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if cfg.q_lora_rank == 0:
      self.wq = Linear(cfg.dim, h * qk, ('embed', 'heads'), cfg, rngs)
    else:
      self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ('embed', 'q_lora'), cfg, rngs)
      self.q_norm = RMSNorm(cfg.q_lora_rank, cfg, axis_name='q_lora')
      self.wq_b = Linear(cfg.q_lora_rank, h * qk, ('q_lora', 'heads'), cfg, rngs)
    self.wkv_a = Linear(cfg.dim, c + r, ('embed', 'kv_lora'), cfg, rngs)
    self.kv_norm = RMSNorm(c, cfg, axis_name='kv_lora')
    self.wkv_b = Linear(c, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), ('kv_lora', 'heads'), cfg, rngs)
    self.wo = Linear(h * cfg.v_head_dim, cfg.dim, ('heads', 'embed'), cfg, rngs)

  def query(self, x_BTD, positions_BT):
    """Per-head queries split into (q_nope [B,T,H,N], rotated q_pe [B,T,H,R])."""
    cfg = self.cfg
    q = self.wq(x_BTD) if cfg.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x_BTD)))
    q_BTHNR = q.reshape(*x_BTD.shape[:2], cfg.n_heads, cfg.qk_head_dim)
    q_nope_BTHN, q_pe_BTHR = jnp.split(q_BTHNR, [cfg.qk_nope_head_dim], axis=-1)
    return q_nope_BTHN, apply_rope(q_pe_BTHR, positions_BT, cfg)

  def latent(self, x_BTD, positions_BT):
    """What the decode cache stores: normalised latent [B,T,C] and rotated shared key [B,T,R]."""
    c_BTC, k_pe_BTR = jnp.split(self.wkv_a(x_BTD), [self.cfg.kv_lora_rank], axis=-1)
    return self.kv_norm(c_BTC), apply_rope(k_pe_BTR, positions_BT, self.cfg)

  def __call__(self, x_BTD, positions_BT):
    cfg = self.cfg
    b, t = x_BTD.shape[:2]
    q_nope_BTHN, q_pe_BTHR = self.query(x_BTD, positions_BT)
    c_BTC, k_pe_BTR = self.latent(x_BTD, positions_BT)
    kv = self.wkv_b(c_BTC).reshape(b, t, cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
    k_nope_BTHN, v_BTHV = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
    out_BTHV = causal_attention(q_nope_BTHN, q_pe_BTHR, k_nope_BTHN, k_pe_BTR, v_BTHV, cfg.softmax_scale)
    return self.wo(out_BTHV.reshape(b, t, cfg.n_heads * cfg.v_head_dim))


def causal_attention(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale):
  """softmax(scale * (q_nope.k_nope + q_pe.k_pe) + causal mask) @ v, with T == S and float32 softmax."""
  f32 = jnp.float32
  scores_BHTS = (jnp.einsum('bthn,bshn->bhts', q_nope_BTHN, k_nope_BSHN, preferred_element_type=f32) +
                 jnp.einsum('bthr,bsr->bhts', q_pe_BTHR, k_pe_BSR, preferred_element_type=f32)) * scale
  t, s = scores_BHTS.shape[-2:]
  causal_TS = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
  scores_BHTS = jnp.where(causal_TS, scores_BHTS, -jnp.inf)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BSHV.dtype)
  return jnp.einsum('bhts,bshv->bthv', probs_BHTS, v_BSHV)
