"""Training schedules as functions of tokens seen (paper §4.2 and §5.1).

DeepSeek-V3 pre-training, in tokens:
  LR        0 -> 2.2e-4 linearly over the first 2K steps, constant to 10T, cosine down to 2.2e-5 over 4.3T,
            then 2.2e-5 for 333B and 7.3e-6 for the last 167B;
  batch     3072 -> 15360 sequences over the first 469B tokens, then 15360;
  gamma     (bias update speed) 0.001 for the first 14.3T, then 0;
  lambda    (MTP weight) 0.3 for the first 10T, then 0.1.
Each schedule reads a small ml_collections / dict config so experiments can rescale it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def learning_rate(tokens: float, c: Mapping[str, Any]) -> float:
  """Warmup, constant, cosine decay, then constant tail stages: {peak, warmup_tokens, constant_until,
  decay_tokens, end, tail: [(tokens, lr), ...]}."""
  if tokens < c['warmup_tokens']:
    return c['peak'] * tokens / c['warmup_tokens']
  if tokens < c['constant_until']:
    return c['peak']
  into_decay = tokens - c['constant_until']
  if into_decay < c['decay_tokens']:
    cosine = 0.5 * (1 + math.cos(math.pi * into_decay / c['decay_tokens']))
    return c['end'] + (c['peak'] - c['end']) * cosine
  boundary = c['constant_until'] + c['decay_tokens']
  for stage_tokens, stage_lr in c.get('tail', ()):
    boundary += stage_tokens
    if tokens < boundary:
      return stage_lr
  return c['tail'][-1][1] if c.get('tail') else c['end']


def batch_size(tokens: float, c: Mapping[str, Any]) -> int:
  """Sequences per step, ramped linearly in tokens from `start` to `end` over `ramp_tokens`, rounded down to
  a multiple of `multiple` (each distinct size is one compilation)."""
  if tokens >= c['ramp_tokens'] or c['start'] == c['end']:
    return c['end']
  size = c['start'] + (c['end'] - c['start']) * tokens / c['ramp_tokens']
  return max(c['start'], int(size) // c['multiple'] * c['multiple'])


def piecewise(tokens: float, stages: Sequence[Sequence[float]]) -> float:
  """[(until_tokens, value), ..., (inf, value)]: the value of the first stage that has not ended."""
  for until, value in stages:
    if tokens < until:
      return value
  return stages[-1][1]


def paper_lr(total_tokens: float, peak: float, warmup_tokens: float) -> dict[str, Any]:
  """The V3 LR shape (10T constant / 4.3T cosine / 333B / 167B of 14.8T) rescaled to a shorter run."""
  scale = total_tokens / 14.8e12
  return dict(peak=peak, warmup_tokens=warmup_tokens, constant_until=10e12 * scale, decay_tokens=4.3e12 * scale,
              end=peak / 10, tail=[(333e9 * scale, peak / 10), (167e9 * scale, peak * 7.3e-6 / 2.2e-4)])
