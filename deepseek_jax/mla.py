"""Multi-head Latent Attention (paper §2.1.1, Eq. 1-11; official inference/model.py `MLA`): the MHA form for
training, the cached forms for prefill and decoding.

Without a cache, the heads attend causally through attention.py (dense, blockwise flash, or TPU splash).
Queries: `wq` (q_lora_rank == 0) or the low-rank `wq_a` -> `q_norm` -> `wq_b`. Keys and values come from a
compressed latent: `wkv_a` yields the latent c (kv_lora_rank) and ONE decoupled k_pe shared by every head;
`kv_norm(c)` is up-projected by `wkv_b` into per-head k_nope and v. Scores are
q_nope . k_nope + q_pe . k_pe, which equals attention over the concatenation [k_nope; k_pe] without
materialising the broadcast k_pe. Softmax in float32 (official `softmax(dtype=float32)`).

With a cache (cache.py), new tokens first write their entries at their positions and then attend to every
cached position at or before their own, so a prompt from position 0 (prefill) and a new token (decode) take
one path, as in the official code. The latent caches attend in the absorbed form (official attn_impl
'absorb'): W^UK is folded into the query (q_nope W^UK, one C-wide vector per head), attention runs over the
cached normalised latent and rotated k_pe, and W^UV is applied after attention; the naive cache holds per-head
K and V (attn_impl 'naive', HF transformers' cache).

Letters beyond model.py's key: J the query/key head width N + R; Y wkv_b's per-head width N + V; A the width
of a cached key's non-rotary part (N naive, C absorbed); Z a cached value's width (V naive, C absorbed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import attention
from deepseek_jax import cache as kv
from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.layers import Linear, RMSNorm
from deepseek_jax.rope import apply_rope


class MLA(nnx.Module):
  """Multi-head Latent Attention with the official parameter names."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kv_block = rt.kv_block
    self.attention, self.attention_block = rt.attention, rt.attention_block
    h, j, c, r = cfg.n_heads, cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if cfg.q_lora_rank == 0:
      self.wq = Linear(cfg.dim, h * j, ('embed', 'heads'), cfg, rt, rngs)
    else:
      self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ('embed', 'q_lora'), cfg, rt, rngs)
      self.q_norm = RMSNorm(cfg.q_lora_rank, cfg, rt, axis_name='q_lora')
      self.wq_b = Linear(cfg.q_lora_rank, h * j, ('q_lora', 'heads'), cfg, rt, rngs)
    self.wkv_a = Linear(cfg.dim, c + r, ('embed', 'kv_lora'), cfg, rt, rngs)
    self.kv_norm = RMSNorm(c, cfg, rt, axis_name='kv_lora')
    self.wkv_b = Linear(c, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), ('kv_lora', 'heads'), cfg, rt, rngs)
    self.wo = Linear(h * cfg.v_head_dim, cfg.dim, ('heads', 'embed'), cfg, rt, rngs)

  def query(self, x_BTD, positions_BT):
    """Per-head queries split into (q_nope [B,T,H,N], rotated q_pe [B,T,H,R])."""
    cfg = self.cfg
    q = self.wq(x_BTD) if cfg.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x_BTD)))
    q_BTHJ = q.reshape(*x_BTD.shape[:2], cfg.n_heads, cfg.qk_head_dim)
    q_nope_BTHN, q_pe_BTHR = jnp.split(q_BTHJ, [cfg.qk_nope_head_dim], axis=-1)
    return q_nope_BTHN, apply_rope(q_pe_BTHR, positions_BT, cfg)

  def latent(self, x_BTD, positions_BT):
    """What the latent caches store: normalised latent [B,T,C] and rotated shared key [B,T,R]."""
    c_BTC, k_pe_BTR = jnp.split(self.wkv_a(x_BTD), [self.cfg.kv_lora_rank], axis=-1)
    return self.kv_norm(c_BTC), apply_rope(k_pe_BTR, positions_BT, self.cfg)

  def up_project(self, c_BTC):
    """wkv_b: per-head (k_nope [B,T,H,N], v [B,T,H,V]) from the normalised latent."""
    cfg = self.cfg
    kv_BTHY = self.wkv_b(c_BTC).reshape(*c_BTC.shape[:2], cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
    return jnp.split(kv_BTHY, [cfg.qk_nope_head_dim], axis=-1)

  def __call__(self, x_BTD, positions_BT, cache: kv.LayerCache | None = None):
    """(output [B, T, D], the cache with x's entries written; None without one).

    Without a cache the T positions of x attend causally to each other from position 0 (training). With one,
    each new token attends to the cached positions at or before its own, rows at their own positions."""
    cfg = self.cfg
    b, t = x_BTD.shape[:2]
    q_nope_BTHN, q_pe_BTHR = self.query(x_BTD, positions_BT)
    c_BTC, k_pe_BTR = self.latent(x_BTD, positions_BT)
    if cache is None:
      k_nope_BTHN, v_BTHV = self.up_project(c_BTC)
      out_BTHV = attention.causal(q_nope_BTHN, q_pe_BTHR, k_nope_BTHN, k_pe_BTR, v_BTHV, cfg.softmax_scale,
                                  self.attention, self.attention_block)
    elif isinstance(cache, kv.NaiveCache):
      k_nope_BTHN, v_BTHV = self.up_project(c_BTC)
      k_pe_BTHR = jnp.broadcast_to(k_pe_BTR[:, :, None], (b, t, cfg.n_heads, cfg.qk_rope_head_dim))
      cache = kv.write(cache, kv.NaiveCache(k_nope_BTHN, k_pe_BTHR, v_BTHV), positions_BT)
      out_BTHV = cached_attention(q_nope_BTHN, q_pe_BTHR, cache, positions_BT, cfg.softmax_scale, self.kv_block)
    else:  # a latent cache: the absorbed form
      cache = kv.write(cache, type(cache).entries(c_BTC, k_pe_BTR), positions_BT)
      w_CHY = self.wkv_b.dense_weight().reshape(cfg.kv_lora_rank, cfg.n_heads, -1)
      w_uk_CHN, w_uv_CHV = jnp.split(w_CHY, [cfg.qk_nope_head_dim], axis=-1)
      q_lat_BTHC = jnp.einsum('bthn,chn->bthc', q_nope_BTHN, w_uk_CHN)
      o_lat_BTHC = cached_attention(q_lat_BTHC, q_pe_BTHR, cache, positions_BT, cfg.softmax_scale,
                                    self.kv_block)[..., :cfg.kv_lora_rank]  # FP8 latents are padded to 128
      out_BTHV = jnp.einsum('bthc,chv->bthv', o_lat_BTHC, w_uv_CHV)
    return self.wo(out_BTHV.reshape(b, t, cfg.n_heads * cfg.v_head_dim)), cache


def cached_attention(q_a_BTHA, q_pe_BTHR, cache: kv.LayerCache, positions_BT, scale, kv_block: int):
  """softmax(scale * (q_a.k_a + q_pe.k_pe)) @ value over the cached positions at or before each query's.

  Runs over the cache in blocks of kv_block positions, only as many as the furthest query needs, with an
  online softmax (fp32 running max, sum and output): the cost grows with the filled length, not with the
  cache's capacity. `cache.read` gives a block's (k_a, k_pe [B,S,R], value): for the latent caches k_a and
  the value are the latent [B,S,C] every head shares (output [B,T,H,C]); for the naive cache they are per
  head, [B,S,H,N] and [B,S,H,V]. A key wider than the query (the FP8 latent's padding) is cropped.
  """
  f32 = jnp.float32
  capacity = cache.rows_and_capacity[1]
  size = min(kv_block, capacity)
  if capacity % size:
    raise ValueError(f'cache length {capacity} is not a multiple of kv_block {size}: build it with init_cache')
  width = q_a_BTHA.shape[-1]

  def scores(i):
    """Masked fp32 scores [B, H, T, size] of block i and its values."""
    k_a, k_pe_BSR, value = cache.read(i * size, size)
    shared = k_a.ndim == 3
    scores_BHTS = (jnp.einsum('btha,bsa->bhts' if shared else 'btha,bsha->bhts', q_a_BTHA, k_a[..., :width],
                              preferred_element_type=f32) +
                   jnp.einsum('bthr,bsr->bhts', q_pe_BTHR, k_pe_BSR, preferred_element_type=f32)) * scale
    visible_BTS = i * size + jnp.arange(size)[None, None, :] <= positions_BT[:, :, None]
    return jnp.where(visible_BTS[:, None], scores_BHTS, -jnp.inf), value

  def weighted(probs_BHTS, value):
    # bf16 probabilities x bf16 values accumulated in fp32, written with fp32 operands: their products are
    # exact in fp32, so nothing changes, but XLA:CPU has no BF16 x BF16 -> F32 dot for this layout.
    probs_BHTS, value = probs_BHTS.astype(value.dtype).astype(f32), value.astype(f32)
    if value.ndim == 4:
      return jnp.einsum('bhts,bshz->bthz', probs_BHTS, value, preferred_element_type=f32)
    # The shared latent as a plain batched [H T, S] x [S, C] product, transposed after: asked for in
    # 'bthz' order, XLA:CPU contracts the latent's non-minor S with its generic dot emitter (1.4 ms of a
    # 6.2 ms decode step at batch 8 on the demo's shapes, bench/decode.py's model).
    return jnp.einsum('bhts,bsz->bhtz', probs_BHTS, value, preferred_element_type=f32).transpose(0, 2, 1, 3)

  def attend(i, carry):
    max_BHT, sum_BHT, out_BTHZ = carry
    scores_BHTS, value = scores(i)
    new_max_BHT = jnp.maximum(max_BHT, scores_BHTS.max(-1))
    probs_BHTS = jnp.exp(scores_BHTS - new_max_BHT[..., None])
    rescale_BHT = jnp.exp(max_BHT - new_max_BHT)
    out_BTHZ = out_BTHZ * rescale_BHT.transpose(0, 2, 1)[..., None] + weighted(probs_BHTS, value)
    return new_max_BHT, sum_BHT * rescale_BHT + probs_BHTS.sum(-1), out_BTHZ

  # Block 0 outside the loop: every query sees position 0, so the running max starts finite.
  scores_BHTS, value = scores(0)
  max_BHT = scores_BHTS.max(-1)
  probs_BHTS = jnp.exp(scores_BHTS - max_BHT[..., None])
  init = (max_BHT, probs_BHTS.sum(-1), weighted(probs_BHTS, value))
  needed = jnp.max(positions_BT) // size + 1
  _, sum_BHT, out_BTHZ = jax.lax.fori_loop(1, needed, attend, init)
  return (out_BTHZ / sum_BHT.transpose(0, 2, 1)[..., None]).astype(q_a_BTHA.dtype)
