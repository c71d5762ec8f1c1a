"""Cached inference: KV caches, prefill and decode steps of the main model and its MTP modules (spec §2.2).

A cache holds, per layer, the entries of every position written so far, for a batch of rows that may sit at
different lengths: `prefill` runs the MHA form over right-padded prompts and writes positions [0, T);
`decode` runs new tokens at per-row positions in the cache's form (absorbed latent by default, or naive
per-head K/V), attending to every position at or before each one. Entries past a row's length are stale
and never visible to it; rewriting a position replaces them (how speculative decoding rolls back).

Layer layout follows cfg.scan_layers: stacked caches [L, ...] scanned with the stacked weights, or, for
unrolled models, one cache per layer and (`unstack`) one weight set per layer. XLA:CPU copies a layer's
slice out of a stacked array before using it, so an unrolled decode over stacked arrays would copy every
layer's weights and cache at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.block import Block, scan_blocks_cached, unstack_blocks
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import DeepSeekV3
from pallas_kernels.common import round_up

FORMS = ('absorbed', 'naive')


def init_cache(cfg: ModelConfig, batch: int, length: int, form: str = 'absorbed', dtype=None,
               fp8: bool = False) -> dict:
  """Zero caches for `batch` rows of up to `length` positions: {'dense', 'moe': stacked layers, 'mtp': [...]}.

  dtype defaults to the model's compute dtype; fp8 stores the absorbed latent as FP8 with 1x128 scales. A
  length above cfg.kv_block rounds up to a multiple of it (decoding attends block by block).
  """
  if form not in FORMS:
    raise ValueError(f'cache form must be one of {FORMS}, got {form!r}')
  if fp8 and form != 'absorbed':
    raise ValueError('the FP8 cache stores the absorbed latent: use form="absorbed"')
  dtype = jnp.dtype(dtype or cfg.jnp_dtype)
  b, s, h = batch, (length if length <= cfg.kv_block else round_up(length, cfg.kv_block)), cfg.n_heads

  def layers(n):
    lead = (n,) if n is not None else ()
    if form == 'naive':
      return {'k': jnp.zeros((*lead, b, s, h, cfg.qk_head_dim), dtype),
              'v': jnp.zeros((*lead, b, s, h, cfg.v_head_dim), dtype)}
    layer = {'k_pe': jnp.zeros((*lead, b, s, cfg.qk_rope_head_dim), dtype)}
    if fp8:
      width = round_up(cfg.kv_lora_rank)
      layer['latent'] = jnp.zeros((*lead, b, s, width), jnp.float8_e4m3fn)
      layer['latent_scale'] = jnp.ones((*lead, b, s, width // 128), jnp.float32)
    else:
      layer['latent'] = jnp.zeros((*lead, b, s, cfg.kv_lora_rank), dtype)
    return layer

  def group(n):
    return layers(n) if cfg.scan_layers else [layers(None) for _ in range(n)]

  cache = {'mtp': [layers(None) for _ in range(cfg.n_mtp_layers)]}
  if cfg.n_dense_layers:
    cache['dense'] = group(cfg.n_dense_layers)
  if cfg.n_moe_layers:
    cache['moe'] = group(cfg.n_moe_layers)
  return cache


def bytes_per_token(cache: dict) -> int:
  """Cache bytes per position of one row, over the main model's layers (the MTP modules excluded); works on
  abstract caches (jax.eval_shape) too."""
  total = 0
  for name in ('dense', 'moe'):
    group = cache.get(name)
    if group is None:
      continue
    stacked = isinstance(group, dict)  # arrays [L, B, S, ...], else one dict per layer of [B, S, ...]
    for layer in ([group] if stacked else group):
      for array in layer.values():
        b, s = array.shape[stacked:stacked + 2]
        total += int(np.prod(array.shape)) * jnp.dtype(array.dtype).itemsize // (b * s)
  return total


class Unstacked(nnx.Module):
  """A model's decoding parts with each layer stack split into per-layer blocks (copies of the weights)."""

  def __init__(self, model: DeepSeekV3):
    self.cfg = model.cfg
    self.embed, self.norm, self.head, self.mtp = model.embed, model.norm, model.head, model.mtp
    self.dense_layers, self.moe_layers = unstack_blocks(model.dense_layers), unstack_blocks(model.moe_layers)


def unstack(model: DeepSeekV3) -> DeepSeekV3 | Unstacked:
  """The model to decode with: per-layer weights for an unrolled model (see the module note), else itself."""
  return model if model.cfg.scan_layers else Unstacked(model)


def _run(model: DeepSeekV3 | Unstacked, tokens_BT, positions_BT, cache, method: str):
  x_BTD = model.embed(tokens_BT)
  cache = dict(cache)
  for name, blocks in (('dense', model.dense_layers), ('moe', model.moe_layers)):
    if blocks is None:
      continue
    if isinstance(cache[name], dict):  # stacked
      x_BTD, cache[name] = scan_blocks_cached(blocks, x_BTD, positions_BT, cache[name], method)
      continue
    layers = unstack_blocks(blocks) if isinstance(blocks, Block) else blocks
    cache[name] = list(cache[name])
    for i, block in enumerate(layers):
      x_BTD, cache[name][i] = getattr(block, method)(x_BTD, positions_BT, cache[name][i])
  hidden_BTD = model.norm(x_BTD)
  return model.head(hidden_BTD), hidden_BTD, cache


def prefill(model: DeepSeekV3, tokens_BT, cache):
  """Prompts [B, T] (right-padded) from position 0: (logits [B, T, vocab], final-normed hidden, cache)."""
  positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
  return _run(model, tokens_BT, positions_BT, cache, 'prefill')


def decode(model: DeepSeekV3, tokens_BT, positions_BT, cache):
  """T new tokens per row at the given positions: (logits [B, T, vocab], hidden, cache)."""
  return _run(model, tokens_BT, positions_BT.astype(jnp.int32), cache, 'decode')


def mtp(model: DeepSeekV3, hidden_BTD, next_tokens_BT, positions_BT, cache, method: str, depth: int = 0):
  """MTP depth `depth` on the main model's hidden states (position i reads token i + 1), through its cache:
  (its normalised representation, which model.head turns into logits, cache)."""
  cache = dict(cache)
  mtp_caches = list(cache['mtp'])
  h_BTD, mtp_caches[depth] = model.mtp[depth].cached(
      method, hidden_BTD, next_tokens_BT, positions_BT.astype(jnp.int32), model.embed, mtp_caches[depth])
  cache['mtp'] = mtp_caches
  return h_BTD, cache
