"""Training objective: next-token CE + lambda * MTP CE + alpha * sequence-wise balance loss (spec §3.4, §4.1).

The batch is packed sequences tokens_BS of length S = T + 1: the model reads tokens[:, :-1] and predicts
tokens[:, 1:]. MTP depth k at position i predicts token i + k + 1, so its last k positions have no target and
are masked. L_MTP = (lambda / D) sum_k CE_k. The balance loss is alpha * sum_i f_i P_i per sequence and MoE
layer, averaged over sequences and summed over layers (the MTP block's MoE layer included); only P_i
carries gradient. Expert counts of every MoE layer ride along for the aux-loss-free bias update.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.model import DeepSeekV3, positions
from deepseek_jax.moe import MoEStats


class LossTerms(NamedTuple):
  total: jax.Array
  ce: jax.Array  # next-token cross entropy
  mtp: jax.Array  # lambda * mean over depths of the MTP cross entropy (0 without MTP)
  balance: jax.Array  # alpha * sequence-wise balance loss (0 without MoE layers)
  expert_counts_LE: jax.Array | None  # tokens per expert for each MoE layer, main layers then MTP blocks


def cross_entropy(logits_BTW, targets_BT, mask_BT=None):
  """Mean token cross entropy in float32 over the positions where mask is true."""
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTW.astype(jnp.float32), targets_BT)
  if mask_BT is None:
    return ce_BT.mean()
  mask_BT = mask_BT.astype(jnp.float32)
  return (ce_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def balance_loss(stats: MoEStats):
  """sum over layers of mean over sequences of sum_i f_i P_i (Eq. 17, without alpha); f_i is a count."""
  return (jax.lax.stop_gradient(stats.load_BE) * stats.prob_BE).sum(axis=-1).mean(axis=-1).sum()


def loss_fn(model: DeepSeekV3, tokens_BS, *, mtp_lambda=0.3, balance_alpha=1e-4) -> LossTerms:
  """The DeepSeek-V3 pre-training loss on packed sequences [B, T + 1] (paper defaults lambda 0.3, alpha 1e-4)."""
  inputs_BT, targets_BT = tokens_BS[:, :-1], tokens_BS[:, 1:]
  positions_BT = positions(inputs_BT)
  x_BTD, stats = model.moe_blocks(model.stem(inputs_BT, positions_BT), positions_BT)
  ce, mtp, mtp_stats = output_terms(model, inputs_BT, targets_BT, model.norm(x_BTD), mtp_lambda)
  stats = [s for s in (stats, mtp_stats) if s is not None]
  if stats:
    merged = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats)
    balance, counts = balance_alpha * balance_loss(merged), merged.counts_E
  else:
    balance, counts = jnp.zeros((), jnp.float32), None
  return LossTerms(ce + mtp + balance, ce, mtp, balance, counts)


def output_terms(model: DeepSeekV3, inputs_BT, targets_BT, hidden_BTD, mtp_lambda):
  """(next-token CE, lambda x MTP CE, the MTP blocks' MoE stats or None) from the final-normed hidden state:
  the loss on top of the trunk (pipeline.py runs it on the last chunk)."""
  ce = cross_entropy(model.head(hidden_BTD), targets_BT)
  if not len(model.mtp):
    return ce, jnp.zeros((), jnp.float32), None
  mtp_out = model.mtp_forward(inputs_BT, hidden_BTD)
  t = inputs_BT.shape[1]
  per_depth = []
  for k, logits_BTW in enumerate(mtp_out.logits_DBTW, start=1):
    shifted_BT = jnp.pad(targets_BT[:, k:], ((0, 0), (0, k)))
    valid_BT = jnp.broadcast_to(jnp.arange(t) < t - k, targets_BT.shape)
    per_depth.append(cross_entropy(logits_BTW, shifted_BT, valid_BT))
  return ce, mtp_lambda * jnp.mean(jnp.stack(per_depth)), mtp_out.moe_stats
