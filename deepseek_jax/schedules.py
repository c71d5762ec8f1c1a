"""Training schedules as functions of tokens seen (paper §4.2 and §5.1).

DeepSeek-V3 pre-training, in tokens:
  LR        0 -> 2.2e-4 linearly over the first 2K steps, constant to 10T, cosine down to 2.2e-5 over 4.3T,
            then 2.2e-5 for 333B and 7.3e-6 for the last 167B;
  batch     3072 -> 15360 sequences over the first 469B tokens, then 15360;
  gamma     (bias update speed) 0.001 for the first 14.3T, then 0;
  lambda    (MTP weight) 0.3 for the first 10T, then 0.1.
In a run config every stage boundary is a fraction of the run's tokens (`resolve` turns them into tokens once
the command line's overrides are in), so --config.steps / batch_size / seq_len stretch the whole recipe, as
MaxText's and torchtitan's step-fraction schedules do.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence


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


V3_TOKENS = 14.8e12  # the paper's run, which the fractions below come from


def paper_lr(peak: float, warmup: float) -> dict[str, Any]:
  """The V3 LR shape as fractions of a run: warmup, constant to 10T / 14.8T, cosine over 4.3T to peak / 10,
  then 333B at peak / 10 and 167B at peak x 7.3e-6 / 2.2e-4."""
  return dict(peak=peak, warmup=warmup, constant_until=10e12 / V3_TOKENS, decay=4.3e12 / V3_TOKENS, end=peak / 10,
              tail=[(333e9 / V3_TOKENS, peak / 10), (167e9 / V3_TOKENS, peak * 7.3e-6 / 2.2e-4)])


def run_tokens(steps: int, seq_len: int, batch: int, ramp: Mapping[str, Any] | None = None) -> float:
  """Tokens a run of `steps` steps trains on: batch x seq_len per step, or the batch ramp's sizes stepped
  through (batch_size above, with end=batch) until the ramp ends."""
  step, tokens = _through_ramp(seq_len, batch, ramp, max_steps=steps)
  return tokens + (steps - step) * batch * seq_len


def steps_for(tokens: float, seq_len: int, batch: int, ramp: Mapping[str, Any] | None = None) -> int:
  """The fewest steps whose run_tokens reach `tokens`."""
  step, seen = _through_ramp(seq_len, batch, ramp, max_tokens=tokens)
  return step + max(0, math.ceil((tokens - seen) / (batch * seq_len)))


def _through_ramp(seq_len: int, batch: int, ramp, max_steps: float = math.inf, max_tokens: float = math.inf):
  """(steps, tokens) after stepping through the ramp's batch sizes until it ends, or a limit is reached."""
  step, tokens = 0, 0.0
  while ramp and step < max_steps and tokens < min(max_tokens, ramp['ramp_tokens']):
    tokens += batch_size(tokens, {**ramp, 'end': batch}) * seq_len
    step += 1
  return step, tokens


class Resolved(NamedTuple):
  """A run's schedules in tokens: the inputs of learning_rate and piecewise."""
  total_tokens: float
  lr: dict[str, Any]
  gamma: list[tuple[float, float]]
  mtp_lambda: list[tuple[float, float]]


def resolve(lr: Mapping[str, Any], gamma: Sequence[Sequence[float]], mtp_lambda: Sequence[Sequence[float]],
            total_tokens: float) -> Resolved:
  """Schedules given as fractions of the run ({peak, warmup, constant_until, decay, end, tail: [(fraction,
  lr), ...]} and [(until_fraction, value), ...]) in tokens of a run of `total_tokens`."""
  for key in ('peak', 'warmup', 'constant_until', 'decay', 'end'):
    if key not in lr:
      raise ValueError(f'config.lr.{key} is missing (the LR schedule takes peak, warmup, constant_until, decay, '
                       'end and tail, the boundaries as fractions of the run)')
  for key in ('warmup', 'constant_until', 'decay'):
    if not lr[key] >= 0:
      raise ValueError(f'config.lr.{key}={lr[key]}: a fraction of the run must be >= 0')
  if not lr['peak'] > 0 or not math.isfinite(lr['peak']):
    raise ValueError(f'config.lr.peak={lr["peak"]} must be a positive finite learning rate')
  tokens = lambda fraction: float(fraction) * total_tokens
  stages = lambda name, c: [(tokens(until), float(value)) for until, value in _stages(name, c)]
  return Resolved(total_tokens,
                  dict(peak=lr['peak'], warmup_tokens=tokens(lr['warmup']), constant_until=tokens(lr['constant_until']),
                       decay_tokens=tokens(lr['decay']), end=lr['end'],
                       tail=[(tokens(f), v) for f, v in _stages('lr.tail', lr.get('tail', ()), final=False)]),
                  stages('gamma', gamma), stages('mtp_lambda', mtp_lambda))


def describe(s: Resolved, tokens_per_step: float) -> str:
  """The resolved schedules in steps (of `tokens_per_step`), for the run's first log lines."""
  step = lambda tokens: f'step {tokens / tokens_per_step:,.0f}'
  stages = lambda stages: ', '.join(f'{value:.3g} to {step(until)}' if until < s.total_tokens * 1e3 else
                                    f'then {value:.3g}' for until, value in stages)
  lr = s.lr
  decayed = lr['constant_until'] + lr['decay_tokens']
  tail, boundary = [], decayed
  for tokens, value in lr['tail']:
    boundary += tokens
    tail.append((boundary, value))
  return (f'schedule over {s.total_tokens:,.0f} tokens ({step(s.total_tokens)}): LR 0 -> {lr["peak"]:.3g} by '
          f'{step(lr["warmup_tokens"])}, constant to {step(lr["constant_until"])}, cosine to {lr["end"]:.3g} by '
          f'{step(decayed)}' + (f', {stages(tail)}' if tail else '') +
          f'; gamma {stages(s.gamma)}; MTP lambda {stages(s.mtp_lambda)}')


def _stages(name: str, stages, final: bool = True) -> list[tuple[float, float]]:
  stages = [tuple(stage) if isinstance(stage, (list, tuple)) else (stage,) for stage in stages]
  if (final and not stages) or any(len(stage) != 2 for stage in stages):
    raise ValueError(f'config.{name} must be a list of (fraction of the run, value) pairs, got {stages!r}')
  return stages
