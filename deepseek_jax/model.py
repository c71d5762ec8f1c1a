"""DeepSeek-V3: embedding, n_dense_layers dense blocks, MoE blocks, final norm, output head, MTP modules.

The dense blocks and the MoE blocks are each one stacked module run by `jax.lax.scan` (block.py). The MTP
modules (mtp.py) follow the main model and receive its embedding and head as arguments.

Shape-letter key, used in every array name (`x_BTD`) and einsum in this package:
  B batch                T query positions       S key positions        D model dim (`dim`)
  W vocabulary           H heads                 N qk_nope_head_dim     R qk_rope_head_dim
  V v_head_dim           Q q_lora_rank           C kv_lora_rank         F inter_dim (dense FFN)
  I moe_inter_dim        E routed experts        G expert groups        K experts per token (top-k)
  X tokens, flattened    M routed token copies (X * K)                  L stacked layers
  U dispatched expert rows (the M copies laid out by expert, padded)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.block import Block, scan_blocks, stack
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers import Embed, Linear, RMSNorm
from deepseek_jax.moe import MoEStats
from deepseek_jax.mtp import MTP


class ModelOutput(NamedTuple):
  logits_BTW: jax.Array
  hidden_BTD: jax.Array  # final-normed hidden state (the head's input and MTP depth 1's input)
  moe_stats: MoEStats | None  # stacked over the MoE layers: counts_LE, load_LBE, prob_LBE


class MTPOutput(NamedTuple):
  logits_DBTW: jax.Array  # depth-major; depth k at position i predicts token i + k + 1 (k from 0 here)
  moe_stats: MoEStats | None  # stacked over depths


class DeepSeekV3(nnx.Module):
  """The DeepSeek-V3 language model (and V2-shaped models: softmax routing, no q compression)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs)
    self.dense_layers = (stack(lambda r: Block(cfg, 0, r), cfg.n_dense_layers, rngs)
                         if cfg.n_dense_layers else None)
    self.moe_layers = (stack(lambda r: Block(cfg, cfg.n_dense_layers, r), cfg.n_moe_layers, rngs)
                       if cfg.n_moe_layers else None)
    self.norm = RMSNorm(cfg.dim, cfg)
    self.head = Linear(cfg.dim, cfg.vocab_size, ('embed', 'vocab'), cfg, rngs, quantize=False)
    self.mtp = nnx.List([MTP(cfg, k, rngs) for k in range(cfg.n_mtp_layers)])

  def __call__(self, tokens_BT) -> jax.Array:
    """Next-token logits [B, T, vocab] (float32 when the params and dtype are float32)."""
    return self.forward(tokens_BT).logits_BTW

  def forward(self, tokens_BT) -> ModelOutput:
    positions_BT = positions(tokens_BT)
    x_BTD, stats = self.moe_blocks(self.stem(tokens_BT, positions_BT), positions_BT)
    hidden_BTD = self.norm(x_BTD)
    return ModelOutput(self.head(hidden_BTD), hidden_BTD, stats)

  def stem(self, tokens_BT, positions_BT) -> jax.Array:
    """The embedding and the dense blocks (what the first pipeline chunk runs before its MoE blocks)."""
    x_BTD = self.embed(tokens_BT)
    if self.dense_layers is not None:
      x_BTD, _ = scan_blocks(self.dense_layers, x_BTD, positions_BT, self.cfg.remat, not self.cfg.scan_layers)
    return x_BTD

  def moe_blocks(self, x_BTD, positions_BT) -> tuple[jax.Array, MoEStats | None]:
    """The MoE blocks in order (a pipeline chunk holds a slice of them); the final norm is left to the caller."""
    if self.moe_layers is None:
      return x_BTD, None
    return scan_blocks(self.moe_layers, x_BTD, positions_BT, self.cfg.remat, not self.cfg.scan_layers)

  def mtp_forward(self, tokens_BT, hidden_BTD) -> MTPOutput:
    """Logits of every MTP depth, given the input tokens and `forward(tokens_BT).hidden_BTD`.

    Depth k (1-based) at position i sees token i + k, so its last k positions have no real input token
    (they read token 0) and must be masked by the loss, which `loss.py` does.
    """
    if not len(self.mtp):
      raise ValueError('mtp_forward: this model has n_mtp_layers == 0')
    positions_BT = positions(tokens_BT)
    h_BTD, logits, stats = hidden_BTD, [], []
    for k, module in enumerate(self.mtp, start=1):
      shifted_BT = jnp.pad(tokens_BT[:, k:], ((0, 0), (0, k)))
      h_BTD, logits_BTW, layer_stats = module(h_BTD, shifted_BT, positions_BT, self.embed, self.head)
      logits.append(logits_BTW)
      stats.append(layer_stats)
    stacked = None if stats[0] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
    return MTPOutput(jnp.stack(logits), stacked)


def positions(tokens_BT):
  return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
