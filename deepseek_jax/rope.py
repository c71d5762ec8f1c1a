"""Rotary position embedding with YaRN on interleaved pairs (official inference/model.py `precompute_freqs_cis`,
`apply_rotary_emb`; paper §2.1.1, §4.3).

DeepSeek rotates the decoupled RoPE parts `q_pe` and `k_pe` as complex numbers (x[2j], x[2j+1]) — interleaved
pairs, not the rotate-half layout — so the released `wq_b` / `wkv_a` rows load without permutation. YaRN
stretches the low frequencies by `rope_factor` with a linear ramp between the correction dims of
beta_fast and beta_slow; it is active when max_seq_len > original_seq_len, as in the official code. The
matching softmax correction (mscale^2) lives in `ModelConfig.softmax_scale`.

Letters beyond model.py's key: O the rotated pairs (R / 2).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Per-pair angular frequencies [qk_rope_head_dim // 2], float32 like both references."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  freqs = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
  freqs = freqs.astype(np.float32)
  if not cfg.yarn:
    return freqs

  def correction_dim(rotations):
    return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp, as the official code does
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  smooth = 1 - ramp  # 1 keeps the original frequency (high-frequency dims), 0 divides it by the factor
  return (freqs / np.float32(cfg.rope_factor) * (1 - smooth) + freqs * smooth).astype(np.float32)


def apply_rope(x, positions_BT, cfg: ModelConfig):
  """Rotates the last axis of x [B, T, ..., R] by the angles of positions_BT, in float32."""
  angles_BTO = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))
  cos, sin = jnp.cos(angles_BTO), jnp.sin(angles_BTO)
  if cfg.yarn and cfg.rope_attention_factor != 1.0:
    cos, sin = cos * cfg.rope_attention_factor, sin * cfg.rope_attention_factor
  # Broadcast over any axes between T and the rotated one (the head axis of q_pe).
  expand = (slice(None), slice(None)) + (None,) * (x.ndim - 3)
  cos, sin = cos[expand], sin[expand]
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  real, imag = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)
