"""Token choice: greedy / temperature / top-k / top-p sampling, the speculative acceptance rule, and the
cache-free greedy rollout.

`greedy_rollout` re-runs the model on a fixed-size token buffer each step (one compilation) and takes the
argmax at the last filled position: quadratic in length, it is the reference generator that cached decoding
(generate.py) must reproduce token for token.

`accept_draft` is the lossless speculative-sampling rule (Leviathan et al., 2023; Chen et al., 2023): keep a
draft token d drawn from q with probability min(1, p(d) / q(d)), otherwise draw from max(p - q, 0)
renormalised. The emitted token is then distributed exactly as p; at temperature 0 both are argmaxes and
the rule reduces to "keep the draft if it is the target's argmax".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model import DeepSeekV3


class SamplingParams(NamedTuple):
  """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def check_params(params: SamplingParams, vocab_size: int) -> None:
  """Raises ValueError naming the first sampling parameter no sampler can use (NaN included)."""
  if not 0 <= params.temperature < float('inf'):
    raise ValueError(f'temperature={params.temperature} must be a finite number >= 0 (0: greedy)')
  if not 0 < params.top_p <= 1:
    raise ValueError(f'top_p={params.top_p} must lie in (0, 1]')
  if not 0 <= params.top_k <= vocab_size:
    raise ValueError(f'top_k={params.top_k} must lie in [0, vocab_size={vocab_size}] (0: all)')


def filtered_logits(logits_BW, params: SamplingParams):
  """Logits / temperature in float32 with every token outside the top-k and the top-p nucleus at -inf."""
  logits_BW = logits_BW.astype(jnp.float32) / params.temperature
  if params.top_k:
    kth_B1 = jax.lax.top_k(logits_BW, params.top_k)[0][:, -1:]
    logits_BW = jnp.where(logits_BW < kth_B1, -jnp.inf, logits_BW)
  if params.top_p < 1.0:
    sorted_BW = jnp.sort(logits_BW, axis=-1)[:, ::-1]
    before_BW = jnp.cumsum(jax.nn.softmax(sorted_BW, axis=-1), axis=-1) - jax.nn.softmax(sorted_BW, axis=-1)
    # The smallest set whose probability reaches top_p: tokens whose predecessors already sum to < top_p.
    cutoff_B1 = jnp.min(jnp.where(before_BW < params.top_p, sorted_BW, jnp.inf), axis=-1, keepdims=True)
    logits_BW = jnp.where(logits_BW < cutoff_B1, -jnp.inf, logits_BW)
  return logits_BW


def argmax(logits_BW):
  """jnp.argmax over the last axis (the first index of the largest value, of the first NaN if any) in plain
  reductions: XLA:CPU runs argmax's paired (value, index) reduction unvectorized, measured at 97 us for
  8 x 4,096 logits against 50 us this way (2 cores), in every greedy decode step."""
  nan_BW = jnp.isnan(logits_BW)  # XLA:CPU's max does not propagate NaN: handled apart
  best_B1 = jnp.where(nan_BW, -jnp.inf, logits_BW).max(axis=-1, keepdims=True)
  hit_BW = jnp.where(nan_BW.any(axis=-1, keepdims=True), nan_BW, logits_BW == best_B1)
  vocab = logits_BW.shape[-1]
  return jnp.min(jnp.where(hit_BW, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)


def sample(logits_BW, key, params: SamplingParams):
  """One token per row: the argmax at temperature 0, else a draw from the filtered distribution."""
  if params.temperature == 0:
    return argmax(logits_BW)
  return jax.random.categorical(key, filtered_logits(logits_BW, params), axis=-1).astype(jnp.int32)


def accept_draft(target_logits_BW, draft_logits_BW, draft_B, key, params: SamplingParams):
  """(accepted_B, token_B): whether each row keeps its draft, and the token it emits (the draft when kept)."""
  if params.temperature == 0:
    target_B = argmax(target_logits_BW)
    return target_B == draft_B, target_B
  p_BW = jax.nn.softmax(filtered_logits(target_logits_BW, params), axis=-1)
  q_BW = jax.nn.softmax(filtered_logits(draft_logits_BW, params), axis=-1)
  rows_B = jnp.arange(draft_B.shape[0])
  accept_key, resample_key = jax.random.split(key)
  ratio_B = p_BW[rows_B, draft_B] / jnp.maximum(q_BW[rows_B, draft_B], 1e-30)
  accepted_B = jax.random.uniform(accept_key, draft_B.shape) < ratio_B
  residual_BW = jnp.maximum(p_BW - q_BW, 0.0)
  residual_BW = jnp.where(residual_BW.sum(-1, keepdims=True) > 0, residual_BW, p_BW)
  resampled_B = jax.random.categorical(resample_key, jnp.log(residual_BW), axis=-1).astype(jnp.int32)
  return accepted_B, jnp.where(accepted_B, draft_B, resampled_B)


def greedy_rollout(model: DeepSeekV3, prompt_BT, max_new_tokens: int):
  """Appends max_new_tokens argmax tokens to every prompt (all prompts share one length)."""
  b, t = prompt_BT.shape
  total = t + max_new_tokens
  if total > model.cfg.max_seq_len:
    raise ValueError(f'greedy_rollout: prompt length {t} + max_new_tokens {max_new_tokens} exceeds '
                     f'max_seq_len {model.cfg.max_seq_len}')
  buffer_BT = jnp.zeros((b, total), jnp.int32).at[:, :t].set(prompt_BT)
  return _rollout(model, buffer_BT, t)


@nnx.jit(static_argnums=2)
def _rollout(model, buffer_BT, start):
  def step(position, buffer_BT):
    logits_BTW = model(buffer_BT)  # causal: positions past `position` do not affect it
    next_B = jnp.argmax(logits_BTW[:, position - 1], axis=-1).astype(jnp.int32)
    return buffer_BT.at[:, position].set(next_B)

  return jax.lax.fori_loop(start, buffer_BT.shape[1], step, buffer_BT)
