"""Greedy rollout by full forward passes: the simple, cache-free reference generator.

Each step re-runs the model on a fixed-size token buffer (one compilation for the whole rollout) and takes
the argmax at the last filled position. Cost is quadratic in length; it is the ground truth that cached
decoding must reproduce, and the sampler the trainer uses for its end-of-run sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model import DeepSeekV3


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
