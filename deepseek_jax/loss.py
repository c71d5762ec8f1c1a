"""Training objective: next-token CE + lambda * MTP CE + alpha * sequence-wise balance loss (paper §2.2,
Eq. 17-20 and 24-25).

The batch is packed sequences tokens_BS of length S = T + 1: the model reads tokens[:, :-1] and predicts
tokens[:, 1:]. MTP depth k at position i predicts token i + k + 1, so its last k positions have no target and
are masked. L_MTP = (lambda / D) sum_k CE_k. The balance loss is alpha * sum_i f_i P_i per sequence and MoE
layer, averaged over sequences and summed over layers (the MTP block's MoE layer included); only P_i
carries gradient. `terms` turns the model's outputs into these terms and `output_terms` runs the MTP modules
on the trunk's output first (`loss_fn` and the pipeline's last chunk both end with it); the expert counts of
every MoE layer ride along, keyed by layer path, for the aux-loss-free bias update
(router.update_router_bias).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.model import DeepSeekV3, ModelOutput, MTPOutput
from deepseek_jax.moe import MoEStats


class LossTerms(NamedTuple):
  total: jax.Array
  ce: jax.Array  # next-token cross entropy
  mtp: jax.Array  # lambda * mean over depths of the MTP cross entropy (0 without MTP)
  balance: jax.Array  # alpha * sequence-wise balance loss (0 without MoE layers)
  expert_counts: dict[str, jax.Array]  # tokens per expert, keyed by MoE layer path ([L, E] stacked, [E])


def cross_entropy(logits_BTW, targets_BT, mask_BT=None):
  """Mean token cross entropy in float32 over the positions where mask is true."""
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTW.astype(jnp.float32), targets_BT)
  if mask_BT is None:
    return ce_BT.mean()
  mask_BT = mask_BT.astype(jnp.float32)
  return (ce_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def head_cross_entropy(head, hidden_BTD, targets_BT, mask_BT=None, chunk: int = 1024):
  """cross_entropy(head(hidden), targets, mask) without the [B, T, vocab] logits: `chunk` tokens at a time
  in a scan whose body is rematerialized (jax.checkpoint), so the backward pass recomputes each chunk's
  logits from its hidden rows and only [chunk, vocab] exists at once; the head's weight gradient
  accumulates over the chunks. A batch of one chunk keeps its logits for the backward pass instead."""
  b, t, d = hidden_BTD.shape
  x, n = b * t, -(-(b * t) // chunk)
  mask_X = jnp.ones((x,), jnp.float32) if mask_BT is None else mask_BT.reshape(x).astype(jnp.float32)

  def ce(hidden_LD, targets_L):
    return optax.softmax_cross_entropy_with_integer_labels(head(hidden_LD).astype(jnp.float32), targets_L)

  if n == 1:
    ce_X = ce(hidden_BTD.reshape(x, d), targets_BT.reshape(x))
  else:
    pad = n * chunk - x  # padded rows: target 0, mask 0
    hidden_NLD = jnp.pad(hidden_BTD.reshape(x, d), ((0, pad), (0, 0))).reshape(n, chunk, d)
    targets_NL = jnp.pad(targets_BT.reshape(x), (0, pad)).reshape(n, chunk)
    ce_X = jax.lax.map(lambda a: jax.checkpoint(ce)(*a), (hidden_NLD, targets_NL)).reshape(-1)[:x]
  return (ce_X * mask_X).sum() / jnp.maximum(mask_X.sum(), 1.0)


def balance_loss(stats: MoEStats):
  """sum over layers of mean over sequences of sum_i f_i P_i (Eq. 17, without alpha); f_i is a count."""
  return (jax.lax.stop_gradient(stats.load_BE) * stats.prob_BE).sum(axis=-1).mean(axis=-1).sum()


def balance(moe_stats: Mapping[str, MoEStats], balance_alpha):
  """alpha times the balance loss of every MoE layer in moe_stats."""
  return balance_alpha * sum((balance_loss(s) for s in moe_stats.values()), jnp.zeros((), jnp.float32))


def terms(head, out: ModelOutput, mtp_out: MTPOutput | None, targets_BT, mtp_lambda, balance_alpha,
          chunk: int) -> LossTerms:
  """The loss terms of the model's outputs on inputs whose next tokens are targets_BT, the cross entropies
  from the hidden states through `head` (head_cross_entropy: the outputs' logits go unused, and XLA drops
  them)."""
  ce = head_cross_entropy(head, out.hidden_BTD, targets_BT, chunk=chunk)
  stats = dict(out.moe_stats)
  mtp = jnp.zeros((), jnp.float32)
  if mtp_out is not None:
    t = targets_BT.shape[1]
    per_depth = []
    for k, hidden_BTD in enumerate(mtp_out.hidden_PBTD, start=1):
      shifted_BT = jnp.pad(targets_BT[:, k:], ((0, 0), (0, k)))
      valid_BT = jnp.broadcast_to(jnp.arange(t) < t - k, targets_BT.shape)
      per_depth.append(head_cross_entropy(head, hidden_BTD, shifted_BT, valid_BT, chunk))
    mtp = mtp_lambda * jnp.mean(jnp.stack(per_depth))
    stats.update(mtp_out.moe_stats)
  bal = balance(stats, balance_alpha)
  return LossTerms(ce + mtp + bal, ce, mtp, bal, {path: s.counts_E for path, s in stats.items()})


def loss_fn(model: DeepSeekV3, tokens_BS, *, mtp_lambda=0.3, balance_alpha=1e-4) -> LossTerms:
  """The DeepSeek-V3 pre-training loss on packed sequences [B, T + 1] (paper defaults lambda 0.3, alpha 1e-4)."""
  inputs_BT, targets_BT = tokens_BS[:, :-1], tokens_BS[:, 1:]
  return output_terms(model, model.forward(inputs_BT), targets_BT, mtp_lambda, balance_alpha)


def output_terms(model: DeepSeekV3, out: ModelOutput, targets_BT, mtp_lambda, balance_alpha) -> LossTerms:
  """The loss on top of the trunk's outputs: the MTP modules (if any) on out.hidden_BTD, then `terms`."""
  mtp_out = None
  if len(model.mtp):
    # Depth 1 reads the token after each input position; the last position has no MTP target, and reads
    # padding (token 0), like every position past T - k at depth k.
    mtp_out = model.mtp_forward(targets_BT.at[:, -1].set(0), out.hidden_BTD)
  return terms(model.head, out, mtp_out, targets_BT, mtp_lambda, balance_alpha, model.rt.head_chunk)
