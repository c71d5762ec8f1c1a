"""Multi-head Latent Attention (spec §2.1-2.3): the MHA form for training and prefill, the absorbed form for
decoding.

Queries: `wq` (q_lora_rank == 0) or the low-rank `wq_a` -> `q_norm` -> `wq_b`. Keys and values come from a
compressed latent: `wkv_a` yields the latent c (kv_lora_rank) and ONE decoupled k_pe shared by every head;
`kv_norm(c)` is up-projected by `wkv_b` into per-head k_nope and v. Scores are
q_nope . k_nope + q_pe . k_pe, which equals attention over the concatenation [k_nope; k_pe] without
materialising the broadcast k_pe. Softmax in float32 (official `softmax(dtype=float32)`).

Decoding (spec §2.2 "absorb"): W^UK is folded into the query (q_nope W^UK, one 512-wide vector per head),
attention runs over the cached normalised latent and rotated k_pe, and W^UV is applied after attention, so
the cache holds C + R numbers per token and layer, shared by every head (MQA with K 576 / V 512 wide for
V3). The naive form caches per-head K [H, N + R] and V [H, V] as HF transformers does; both read the same
cache positions, so either can be checked against a full forward. Cache layers are dicts:
  absorbed: latent [B, S, C] (or FP8 codes + 1x128 scales latent_scale [B, S, C/128]), k_pe [B, S, R]
  naive:    k [B, S, H, N + R], v [B, S, H, V]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import Linear, RMSNorm
from deepseek_jax.rope import apply_rope
from pallas_kernels import act_quant


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
    return self.prefill(x_BTD, positions_BT)[0]

  def prefill(self, x_BTD, positions_BT, cache=None):
    """MHA-form attention over the T positions of x (from position 0); with a cache layer, also writes
    their entries into it. Returns (output, cache)."""
    cfg = self.cfg
    b, t = x_BTD.shape[:2]
    q_nope_BTHN, q_pe_BTHR = self.query(x_BTD, positions_BT)
    c_BTC, k_pe_BTR = self.latent(x_BTD, positions_BT)
    k_nope_BTHN, v_BTHV = self.up_project(c_BTC)
    out_BTHV = causal_attention(q_nope_BTHN, q_pe_BTHR, k_nope_BTHN, k_pe_BTR, v_BTHV, cfg.softmax_scale)
    if cache is not None:
      cache = write_cache(cache, self._entries(c_BTC, k_pe_BTR, k_nope_BTHN, v_BTHV, cache), positions_BT)
    return self.wo(out_BTHV.reshape(b, t, cfg.n_heads * cfg.v_head_dim)), cache

  def up_project(self, c_BTC):
    """wkv_b: per-head (k_nope [B,T,H,N], v [B,T,H,V]) from the normalised latent."""
    cfg = self.cfg
    kv = self.wkv_b(c_BTC).reshape(*c_BTC.shape[:2], cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
    return jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)

  def decode(self, x_BTD, positions_BT, cache):
    """Attention of T new tokens at per-row positions over everything cached at or before them; writes the
    new tokens' entries first. The cache layer's keys choose the form. Returns (output, cache)."""
    cfg = self.cfg
    b, t = x_BTD.shape[:2]
    q_nope_BTHN, q_pe_BTHR = self.query(x_BTD, positions_BT)
    c_BTC, k_pe_BTR = self.latent(x_BTD, positions_BT)
    if 'latent' in cache:
      cache = write_cache(cache, self._entries(c_BTC, k_pe_BTR, None, None, cache), positions_BT)
      w = self.wkv_b.dense_weight().reshape(cfg.kv_lora_rank, cfg.n_heads, -1)  # [C, H, N + V]
      w_uk_CHN, w_uv_CHV = jnp.split(w, [cfg.qk_nope_head_dim], axis=-1)
      q_lat_BTHC = jnp.einsum('bthn,chn->bthc', q_nope_BTHN, w_uk_CHN)
      o_lat_BTHC = cached_attention(q_lat_BTHC, q_pe_BTHR, cache, positions_BT, cfg.softmax_scale, cfg.kv_block,
                                    functools.partial(latent_keys, width=cfg.kv_lora_rank))
      out_BTHV = jnp.einsum('bthc,chv->bthv', o_lat_BTHC, w_uv_CHV)
    else:
      k_nope_BTHN, v_BTHV = self.up_project(c_BTC)
      cache = write_cache(cache, self._entries(c_BTC, k_pe_BTR, k_nope_BTHN, v_BTHV, cache), positions_BT)
      out_BTHV = cached_attention(q_nope_BTHN, q_pe_BTHR, cache, positions_BT, cfg.softmax_scale, cfg.kv_block,
                                  functools.partial(per_head_keys, nope=cfg.qk_nope_head_dim))
    return self.wo(out_BTHV.reshape(b, t, cfg.n_heads * cfg.v_head_dim)), cache

  def _entries(self, c_BTC, k_pe_BTR, k_nope_BTHN, v_BTHV, cache):
    """The new tokens' cache entries in the cache layer's form and dtypes."""
    if 'latent' in cache:
      entries = {'k_pe': k_pe_BTR.astype(cache['k_pe'].dtype)}
      if 'latent_scale' in cache:
        entries['latent'], entries['latent_scale'] = act_quant.act_quant(c_BTC)
      else:
        entries['latent'] = c_BTC.astype(cache['latent'].dtype)
      return entries
    if k_nope_BTHN is None:
      k_nope_BTHN, v_BTHV = self.up_project(c_BTC)
    k_pe_BTHR = jnp.broadcast_to(k_pe_BTR[:, :, None], (*k_pe_BTR.shape[:2], self.cfg.n_heads, k_pe_BTR.shape[-1]))
    return {'k': jnp.concatenate([k_nope_BTHN, k_pe_BTHR], -1).astype(cache['k'].dtype),
            'v': v_BTHV.astype(cache['v'].dtype)}


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


def write_cache(cache, entries, positions_BT):
  """Each row's entries at its own positions (rows of a batch sit at different lengths)."""
  rows_B1 = jnp.arange(positions_BT.shape[0])[:, None]
  return {name: cache[name].at[rows_B1, positions_BT].set(entries[name]) for name in cache}


def latent_keys(block, width: int):
  """Absorbed form: (latent as key part, k_pe, latent as value) of a cache block, FP8 codes dequantized with
  their 1x128 scales (their width is padded to a multiple of 128) into k_pe's dtype."""
  latent_BSC = block['latent']
  if 'latent_scale' in block:
    latent_BSC = act_quant.dequantize(latent_BSC, block['latent_scale'])[..., :width].astype(block['k_pe'].dtype)
  return latent_BSC, block['k_pe'], latent_BSC


def per_head_keys(block, nope: int):
  """Naive form: (k_nope [B,S,H,N], the k_pe every head shares [B,S,R], v [B,S,H,V]) of a cache block."""
  return block['k'][..., :nope], block['k'][:, :, 0, nope:], block['v']


def cached_attention(q_a_BTHA, q_pe_BTHR, cache, positions_BT, scale, kv_block: int, keys):
  """softmax(scale * (q_a.k_a + q_pe.k_pe)) @ value over the cached keys at or before each query's position.

  Runs over the cache in blocks of kv_block positions, only as many as the furthest query needs, with an
  online softmax (fp32 running max, sum and output): the cost grows with the filled length, not with the
  cache's capacity. `keys(block)` gives a cache block's (k_a, k_pe [B,S,R], value): absorbed, k_a and the
  value are the latent [B,S,C] every head shares (output [B,T,H,C]); naive, per head [B,S,H,N] and [B,S,H,V].
  """
  f32 = jnp.float32
  capacity = next(iter(cache.values())).shape[1]
  size = min(kv_block, capacity)
  if capacity % size:
    raise ValueError(f'cache length {capacity} is not a multiple of kv_block {size}: build it with init_cache')

  def scores(i):
    """Masked fp32 scores [B, H, T, size] of block i and its values."""
    block = {name: jax.lax.dynamic_slice_in_dim(array, i * size, size, axis=1) for name, array in cache.items()}
    k_a, k_pe_BSR, value = keys(block)
    shared = k_a.ndim == 3
    scores_BHTS = (jnp.einsum('btha,bsa->bhts' if shared else 'btha,bsha->bhts', q_a_BTHA, k_a,
                              preferred_element_type=f32) +
                   jnp.einsum('bthr,bsr->bhts', q_pe_BTHR, k_pe_BSR, preferred_element_type=f32)) * scale
    visible_BTS = i * size + jnp.arange(size)[None, None, :] <= positions_BT[:, :, None]
    return jnp.where(visible_BTS[:, None], scores_BHTS, -jnp.inf), value

  def weighted(probs_BHTS, value):
    spec = 'bhts,bsx->bthx' if value.ndim == 3 else 'bhts,bshx->bthx'
    return jnp.einsum(spec, probs_BHTS.astype(value.dtype), value, preferred_element_type=f32)

  def attend(i, carry):
    max_BHT, sum_BHT, out_BTHX = carry
    scores_BHTS, value = scores(i)
    new_max_BHT = jnp.maximum(max_BHT, scores_BHTS.max(-1))
    probs_BHTS = jnp.exp(scores_BHTS - new_max_BHT[..., None])
    rescale_BHT = jnp.exp(max_BHT - new_max_BHT)
    out_BTHX = out_BTHX * rescale_BHT.transpose(0, 2, 1)[..., None] + weighted(probs_BHTS, value)
    return new_max_BHT, sum_BHT * rescale_BHT + probs_BHTS.sum(-1), out_BTHX

  # Block 0 outside the loop: every query sees position 0, so the running max starts finite.
  scores_BHTS, value = scores(0)
  max_BHT = scores_BHTS.max(-1)
  probs_BHTS = jnp.exp(scores_BHTS - max_BHT[..., None])
  init = (max_BHT, probs_BHTS.sum(-1), weighted(probs_BHTS, value))
  needed = jnp.max(positions_BT) // size + 1
  _, sum_BHT, out_BTHX = jax.lax.fori_loop(1, needed, attend, init)
  return (out_BTHX / sum_BHT.transpose(0, 2, 1)[..., None]).astype(q_a_BTHA.dtype)
