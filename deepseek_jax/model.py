"""DeepSeek-V3: embedding, n_dense_layers dense blocks, MoE blocks, final norm, output head, MTP modules.

The trunk (embedding -> blocks -> norm -> head) exists once, in `forward`, as three steps a pipeline stage can
also run on their own: `stem` (embedding and dense blocks), `moe_blocks`, `outputs` (final norm and head).
Training calls it without a cache; prefill and decoding pass a `Cache` (cache.py) and get it back updated.
The dense blocks and the MoE blocks are each one stacked module (block.py). The MTP modules (mtp.py) follow
the main model in `mtp_forward` and receive its embedding and head as arguments.

Shape-letter key, used in every array name (`x_BTD`) and einsum in this package:
  B batch                T query positions       S key positions        D model dim (`dim`)
  W vocabulary           H heads                 N qk_nope_head_dim     R qk_rope_head_dim
  V v_head_dim           Q q_lora_rank           C kv_lora_rank         F inter_dim (dense FFN)
  I moe_inter_dim        E routed experts        G expert groups        K experts per token (top-k)
  X tokens, flattened    M routed token copies (X * K)                  L stacked layers
  U dispatched expert rows (the M copies laid out by expert, padded)    P MTP depths
A module that needs more letters defines them in its docstring (mla.py, grouped_matmul.py, ...).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import cache as kv
from deepseek_jax.block import FFN, Block, run_layers, stack, unstack_blocks
from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.layers import Embed, Linear, RMSNorm
from deepseek_jax.moe import MoEStats
from deepseek_jax.mtp import MTP

MOE_LAYERS = 'moe_layers'
MOE_STATS = f'{MOE_LAYERS}/{FFN}'  # the moe_stats key of the stacked MoE blocks


class ModelOutput(NamedTuple):
  logits_BTW: jax.Array
  hidden_BTD: jax.Array  # final-normed hidden state (the head's input and MTP depth 1's input)
  moe_stats: dict[str, MoEStats]  # keyed by MoE layer path: 'moe_layers/ffn' (stacked over the layers)
  cache: kv.Cache | None


class MTPOutput(NamedTuple):
  logits_PBTW: jax.Array  # depth-major; depth k (from 0) at position i predicts token i + k + 2 of the input
  hidden_PBTD: jax.Array  # each depth's normalised representation, the head's input (a decoder that needs
  # one position's draft applies the head there; XLA then drops the unused full logits)
  moe_stats: dict[str, MoEStats]  # keyed by MoE layer path: 'mtp/<k>/block/ffn'
  cache: kv.Cache | None  # the model's cache with the MTP depths' entries written


class DeepSeekV3(nnx.Module):
  """The DeepSeek-V3 language model (and V2-shaped models: softmax routing, no q compression)."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    self.cfg, self.rt = cfg, rt
    self.embed = Embed(cfg, rt, rngs)
    self.dense_layers = (stack(lambda r: Block(cfg, rt, 0, r), cfg.n_dense_layers, rngs)
                         if cfg.n_dense_layers else None)
    self.moe_layers = (stack(lambda r: Block(cfg, rt, cfg.n_dense_layers, r), cfg.n_moe_layers, rngs)
                       if cfg.n_moe_layers else None)
    self.norm = RMSNorm(cfg.dim, cfg, rt)
    self.head = Linear(cfg.dim, cfg.vocab_size, ('embed', 'vocab'), cfg, rt, rngs, quantize=False)
    self.mtp = nnx.List([MTP(cfg, rt, k, rngs) for k in range(cfg.n_mtp_layers)])

  def __call__(self, tokens_BT) -> jax.Array:
    """Next-token logits [B, T, vocab] (float32 when the params and dtype are float32)."""
    return self.forward(tokens_BT).logits_BTW

  def forward(self, tokens_BT, positions_BT=None, cache: kv.Cache | None = None) -> ModelOutput:
    """The trunk over tokens [B, T] at positions [B, T] (default 0 .. T-1). With a cache, each row's tokens
    are written at its positions and attend to everything cached at or before them (prefill, decoding)."""
    positions_BT = positions(tokens_BT) if positions_BT is None else positions_BT.astype(jnp.int32)
    x_BTD, dense = self.stem(tokens_BT, positions_BT, None if cache is None else cache.dense)
    x_BTD, stats, moe = self.moe_blocks(x_BTD, positions_BT, None if cache is None else cache.moe)
    return self.outputs(x_BTD, stats, None if cache is None else cache._replace(dense=dense, moe=moe))

  def stem(self, tokens_BT, positions_BT, cache=None):
    """The embedding and the dense blocks (a pipeline's first chunk runs them before its MoE blocks):
    (x, the dense blocks' cache)."""
    x_BTD = self.embed(tokens_BT)
    if self.dense_layers is not None:
      x_BTD, _, cache = run_layers(self.dense_layers, x_BTD, positions_BT, cache, self.rt)
    return x_BTD, cache

  def moe_blocks(self, x_BTD, positions_BT, cache=None):
    """The MoE blocks in order (a pipeline chunk holds a slice of them): (x, {path: stats}, their cache)."""
    if self.moe_layers is None:
      return x_BTD, {}, cache
    x_BTD, stats, cache = run_layers(self.moe_layers, x_BTD, positions_BT, cache, self.rt)
    return x_BTD, {MOE_STATS: stats}, cache

  def outputs(self, x_BTD, moe_stats: dict[str, MoEStats], cache: kv.Cache | None = None) -> ModelOutput:
    """The final norm and the output head on the last block's output."""
    hidden_BTD = self.norm(x_BTD)
    return ModelOutput(self.head(hidden_BTD), hidden_BTD, moe_stats, cache)

  def mtp_forward(self, next_tokens_BT, hidden_BTD, positions_BT=None, cache: kv.Cache | None = None) -> MTPOutput:
    """Logits of every MTP depth from `forward(...).hidden_BTD` and the token after each position.

    next_tokens_BT[:, i] is the token at position i + 1 (in training: the targets); depth k (1-based) at
    position i reads the token at i + k, next_tokens shifted left by k - 1, so its last k - 1 positions read
    token 0. Training masks each depth's last k positions (no target there; loss.py), decoding drafts with
    depth 1 only.
    """
    if not len(self.mtp):
      raise ValueError('mtp_forward: this model has n_mtp_layers == 0')
    positions_BT = positions(next_tokens_BT) if positions_BT is None else positions_BT.astype(jnp.int32)
    h_BTD, logits, hiddens, stats, caches = hidden_BTD, [], [], {}, []
    for k, module in enumerate(self.mtp):
      shifted_BT = jnp.pad(next_tokens_BT[:, k:], ((0, 0), (0, k)))
      h_BTD, logits_BTW, layer_stats, layer_cache = module(
          h_BTD, shifted_BT, positions_BT, self.embed, self.head, None if cache is None else cache.mtp[k])
      logits.append(logits_BTW)
      hiddens.append(h_BTD)
      caches.append(layer_cache)
      if layer_stats is not None:
        stats[f'mtp/{k}/block/{FFN}'] = layer_stats
    return MTPOutput(jnp.stack(logits), jnp.stack(hiddens), stats,
                     None if cache is None else cache._replace(mtp=tuple(caches)))

  def init_cache(self, batch: int, length: int, form: kv.CacheForm = kv.CacheForm.ABSORBED,
                 dtype=None) -> kv.Cache:
    """Empty caches for `batch` rows of up to `length` positions, laid out as the layers are (stacked, or one
    per layer for an unstacked model). dtype defaults to the compute dtype; above rt.kv_block positions the
    length rounds up to a whole number of blocks."""
    if not isinstance(form, kv.CacheForm):
      raise ValueError(f'cache form must be one of {[f.value for f in kv.CacheForm]}, got {form!r}')
    dtype = jnp.dtype(dtype or self.rt.jnp_dtype)
    s = kv.capacity(self.rt.kv_block, length)
    zeros = lambda layers=None: kv.zeros(form, self.cfg, batch, s, dtype, layers)

    def group(layers):
      if layers is None:
        return None
      if isinstance(layers, nnx.List):
        return [zeros() for _ in layers]
      return zeros(jax.tree.leaves(nnx.state(layers))[0].shape[0])

    return kv.Cache(group(self.dense_layers), group(self.moe_layers), tuple(zeros() for _ in self.mtp))

  def unstacked(self) -> 'DeepSeekV3':
    """This model with each layer stack split into per-layer blocks holding copies of their weights (decoding
    an unrolled model: XLA:CPU copies a layer's slice of every stacked weight at each step)."""
    model = nnx.merge(*nnx.split(self))  # a new graph over the same arrays
    model.dense_layers = unstack_blocks(self.dense_layers)
    model.moe_layers = unstack_blocks(self.moe_layers)
    return model


def positions(tokens_BT):
  return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)


def moe_layer_ids(cfg: ModelConfig, path: str) -> list[int]:
  """Layer ids (the checkpoint's numbering) of the MoE layers behind a moe_stats key."""
  if path == MOE_STATS:
    return list(range(cfg.n_dense_layers, cfg.n_layers))
  return [cfg.n_layers + int(path.split('/')[1])]  # 'mtp/<k>/block/ffn': MTP depth k is layer n_layers + k
