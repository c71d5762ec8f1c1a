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

import functools
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
  """cross_entropy(head(hidden), targets, mask) without the [B, T, vocab] logits: `chunk` tokens at a time,
  so only [chunk, vocab] exists at once (`_masked_ce_sum`)."""
  b, t, d = hidden_BTD.shape
  mask_X = jnp.ones((b * t,), jnp.float32) if mask_BT is None else mask_BT.reshape(b * t).astype(jnp.float32)
  total = _masked_ce_sum(hidden_BTD.reshape(b * t, d), head.dense_weight(), targets_BT.reshape(b * t), mask_X,
                         chunk)
  return total / jnp.maximum(mask_X.sum(), 1.0)


def _chunks(chunk: int, *arrays_X):
  """[X, ...] arrays as [N, L, ...] chunks of L = min(chunk, X) rows, padded with zeros (padded rows: target
  0, mask 0)."""
  chunk = min(chunk, arrays_X[0].shape[0])
  n = -(-arrays_X[0].shape[0] // chunk)
  pad = lambda a: jnp.pad(a, [(0, n * chunk - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
  return [pad(a).reshape(n, chunk, *a.shape[1:]) for a in arrays_X]


def _chunk_logits(h_LD, w_DW):
  # The head's product as `Linear` runs it (compute dtype), the softmax in float32.
  return jnp.dot(h_LD.astype(w_DW.dtype), w_DW).astype(jnp.float32)


def _chunk_ce(logits_LW, targets_L):
  return optax.softmax_cross_entropy_with_integer_labels(logits_LW, targets_L)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _masked_ce_sum(hidden_XD, w_DW, targets_X, mask_X, chunk):
  """sum_x mask[x] * CE(hidden[x] @ w, targets[x]), one chunk of rows at a time."""
  def add(total, args):
    h_LD, targets_L, mask_L = args
    return total + (_chunk_ce(_chunk_logits(h_LD, w_DW), targets_L) * mask_L).sum(), None

  return jax.lax.scan(add, jnp.zeros((), jnp.float32), _chunks(chunk, hidden_XD, targets_X, mask_X))[0]


def _masked_ce_sum_fwd(hidden_XD, w_DW, targets_X, mask_X, chunk):
  """The sum and its gradients in one pass over the chunks, while each chunk's logits exist: d logits =
  mask * (softmax - onehot), d hidden = d logits @ w^T, d w = sum over chunks of hidden^T @ d logits (float32).
  The loss is a sum, so its backward pass only scales these by the cotangent: no chunk's logits are
  recomputed (a rematerialized scan computes each twice) and the residuals are [X, D] and [D, vocab]."""
  def step(carry, args):
    total, d_w_DW = carry
    h_LD, targets_L, mask_L = args
    logits_LW = _chunk_logits(h_LD, w_DW)
    total += (_chunk_ce(logits_LW, targets_L) * mask_L).sum()
    d_logits_LW = (jax.nn.softmax(logits_LW) - jax.nn.one_hot(targets_L, logits_LW.shape[-1])) * mask_L[:, None]
    d_logits_LW = d_logits_LW.astype(w_DW.dtype)
    d_h_LD = jnp.dot(d_logits_LW, w_DW.T).astype(hidden_XD.dtype)
    d_w_DW += jnp.dot(h_LD.astype(w_DW.dtype).T, d_logits_LW, preferred_element_type=jnp.float32)
    return (total, d_w_DW), d_h_LD

  zeros = (jnp.zeros((), jnp.float32), jnp.zeros(w_DW.shape, jnp.float32))
  (total, d_w_DW), d_h_NLD = jax.lax.scan(step, zeros, _chunks(chunk, hidden_XD, targets_X, mask_X))
  d_hidden_XD = d_h_NLD.reshape(-1, hidden_XD.shape[-1])[:hidden_XD.shape[0]]
  return total, (d_hidden_XD, d_w_DW.astype(w_DW.dtype))


def _masked_ce_sum_bwd(chunk, residuals, g):
  del chunk
  d_hidden_XD, d_w_DW = residuals
  return (g * d_hidden_XD).astype(d_hidden_XD.dtype), (g * d_w_DW).astype(d_w_DW.dtype), None, None


_masked_ce_sum.defvjp(_masked_ce_sum_fwd, _masked_ce_sum_bwd)


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
