"""KV-cache forms of MLA decoding as typed pytrees (paper §2.1.1; official inference/model.py `MLA.forward`,
attn_impl 'absorb' and 'naive').

A layer's cache holds the entries of every position written so far, for a batch of rows that may sit at
different lengths: arrays [B, S, ...], with a leading L for the stacked layers of a scanned model. Entries
past a row's length are stale and never visible to it; rewriting a position replaces them (that is how
speculative decoding rolls back a rejected draft).
  LatentCache     absorbed: the normalised latent [B, S, C] and the rotated shared key k_pe [B, S, R], C + R
                  numbers per token and layer, shared by every head (MQA, keys C + R and values C wide).
  FP8LatentCache  the same with the latent as float8_e4m3fn codes [B, S, C'] and one fp32 scale per 1x128 tile
                  [B, S, C'/128] (C' = C rounded up to 128).
  NaiveCache      per head: k_nope [B, S, H, N], k_pe [B, S, H, R] (each head's copy of the shared key, as HF
                  transformers caches K) and v [B, S, H, V].
`Cache` groups a model's layer caches: dense blocks, MoE blocks and the MTP depths.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from pallas_kernels import act_quant
from pallas_kernels.common import round_up


class CacheForm(enum.Enum):
  ABSORBED = 'absorbed'
  FP8 = 'fp8'
  NAIVE = 'naive'


class LatentCache(NamedTuple):
  latent: jax.Array  # [(L,) B, S, C]
  k_pe: jax.Array  # [(L,) B, S, R]

  @classmethod
  def entries(cls, c_BTC, k_pe_BTR) -> 'LatentCache':
    return cls(c_BTC, k_pe_BTR)

  def read(self, start, size: int):
    """(key part, k_pe [B, size, R], value) of positions [start, start + size): the latent [B, size, C] is
    both the key's non-rotary part and the value."""
    latent = _slice(self.latent, start, size)
    return latent, _slice(self.k_pe, start, size), latent

  @property
  def rows_and_capacity(self) -> tuple[int, int]:
    return self.k_pe.shape[-3:-1]


class FP8LatentCache(NamedTuple):
  latent: jax.Array  # float8_e4m3fn [(L,) B, S, C']
  latent_scale: jax.Array  # float32 [(L,) B, S, C'/128]
  k_pe: jax.Array  # [(L,) B, S, R]

  @classmethod
  def entries(cls, c_BTC, k_pe_BTR) -> 'FP8LatentCache':
    return cls(*act_quant.act_quant(c_BTC), k_pe_BTR)

  def read(self, start, size: int):
    """As LatentCache.read, the latent dequantized into k_pe's dtype (C' wide: the padding columns are 0)."""
    latent = act_quant.dequantize(_slice(self.latent, start, size), _slice(self.latent_scale, start, size))
    k_pe = _slice(self.k_pe, start, size)
    latent = latent.astype(k_pe.dtype)
    return latent, k_pe, latent

  @property
  def rows_and_capacity(self) -> tuple[int, int]:
    return self.k_pe.shape[-3:-1]


class NaiveCache(NamedTuple):
  k_nope: jax.Array  # [(L,) B, S, H, N]
  k_pe: jax.Array  # [(L,) B, S, H, R]
  v: jax.Array  # [(L,) B, S, H, V]

  def read(self, start, size: int):
    """(k_nope [B, size, H, N], the k_pe every head shares [B, size, R], v [B, size, H, V])."""
    return _slice(self.k_nope, start, size), _slice(self.k_pe, start, size)[:, :, 0], _slice(self.v, start, size)

  @property
  def rows_and_capacity(self) -> tuple[int, int]:
    return self.k_pe.shape[-4:-2]


LayerCache = LatentCache | FP8LatentCache | NaiveCache


class Cache(NamedTuple):
  """A model's caches: each layer group stacked ([L, ...], scanned models) or one per layer (a list, for a
  model whose layers are unstacked); None for a group the model does not have."""
  dense: Any
  moe: Any
  mtp: tuple  # one LayerCache per MTP depth


def _slice(array, start, size: int):
  return jax.lax.dynamic_slice_in_dim(array, start, size, axis=1)


def write(cache: LayerCache, entries: LayerCache, positions_BT) -> LayerCache:
  """Each row's entries [B, T, ...] at its own positions [B, T], cast to the cache's dtypes."""
  rows_B1 = jnp.arange(positions_BT.shape[0])[:, None]
  return jax.tree.map(lambda array, new: array.at[rows_B1, positions_BT].set(new.astype(array.dtype)), cache,
                      entries)


def capacity(kv_block: int, length: int) -> int:
  """Cache positions for `length`: above one attention block, a whole number of blocks (decoding attends
  block by block)."""
  return length if length <= kv_block else round_up(length, kv_block)


def zeros(form: CacheForm, cfg: ModelConfig, batch: int, length: int, dtype, layers: int | None = None) -> LayerCache:
  """An empty layer cache of `form` for batch rows and `length` positions (stacked over `layers` if given)."""
  lead = () if layers is None else (layers,)
  b, s, h = batch, length, cfg.n_heads
  if form is CacheForm.NAIVE:
    return NaiveCache(jnp.zeros((*lead, b, s, h, cfg.qk_nope_head_dim), dtype),
                      jnp.zeros((*lead, b, s, h, cfg.qk_rope_head_dim), dtype),
                      jnp.zeros((*lead, b, s, h, cfg.v_head_dim), dtype))
  k_pe = jnp.zeros((*lead, b, s, cfg.qk_rope_head_dim), dtype)
  if form is CacheForm.FP8:
    width = round_up(cfg.kv_lora_rank)
    return FP8LatentCache(jnp.zeros((*lead, b, s, width), jnp.float8_e4m3fn),
                          jnp.ones((*lead, b, s, width // 128), jnp.float32), k_pe)
  if form is CacheForm.ABSORBED:
    return LatentCache(jnp.zeros((*lead, b, s, cfg.kv_lora_rank), dtype), k_pe)
  raise ValueError(f'cache form must be a CacheForm, got {form!r}')


def shardings(cache: Cache, mesh) -> Cache:
  """NamedShardings for a cache (or its abstract form): every array split by rows over the mesh's batch axes
  (sharding.RULES['batch']), so each device holds its rows' latents, as data-parallel attention needs."""
  def one(layer):
    rows = -4 if isinstance(layer, NaiveCache) else -3  # [(L,) B, S, H, N] or [(L,) B, S, X]
    return type(layer)(*(sharding.batch_sharding(mesh, a.ndim, a.ndim + rows, a.shape[a.ndim + rows])
                         for a in layer))

  return jax.tree.map(one, cache, is_leaf=lambda x: isinstance(x, (LatentCache, FP8LatentCache, NaiveCache)))


def bytes_per_token(cache: Cache) -> int:
  """Cache bytes per position of one row over the main model's layers (MTP excluded); works on abstract
  caches (jax.eval_shape) too."""
  layers = [layer for group in (cache.dense, cache.moe) if group is not None
            for layer in (group if isinstance(group, list) else [group])]
  total = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for layer in layers for a in layer)
  rows, positions = layers[0].rows_and_capacity
  return total // (rows * positions)
