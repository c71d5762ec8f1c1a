"""Pipeline schedules as lockstep timetables, and the bubble each one leaves.

An SPMD pipeline runs every stage in the same program, one tick at a time: at each tick a stage runs the
forward (F) or backward (B) of one microbatch, or idles, and activations / gradients move to the neighbouring
stage between ticks. A schedule is each stage's order of operations; `timetable` places them at the earliest
tick their inputs allow (F of microbatch i on stage s after F of i on stage s - 1; B of i on stage s after
F of i on s and B of i on stage s + 1). The bubble is the share of stage-time spent idle.

  GPipe: every forward, then every backward: bubble (P - 1) / (M + P - 1), M activations held per stage.
  1F1B:  P - s - 1 warm-up forwards on stage s, then one forward one backward: the same bubble, but stage s
         holds at most P - s microbatches' activations (Narayanan et al., 2021).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence


class Op(NamedTuple):
  kind: str  # 'F' or 'B'
  micro: int


def gpipe(n_stages: int, n_micro: int) -> list[list[Op]]:
  """Per stage, all forwards then all backwards (backwards in reverse order, as autodiff runs them)."""
  return [[Op('F', i) for i in range(n_micro)] + [Op('B', i) for i in reversed(range(n_micro))]
          for _ in range(n_stages)]


def one_f_one_b(n_stages: int, n_micro: int) -> list[list[Op]]:
  """Per stage s: min(P - s - 1, M) warm-up forwards, then alternate F and B, then the remaining backwards."""
  orders = []
  for s in range(n_stages):
    warmup = min(n_stages - s - 1, n_micro)
    order = [Op('F', i) for i in range(warmup)]
    forward, backward = warmup, 0
    while backward < n_micro:
      if forward < n_micro:
        order.append(Op('F', forward))
        forward += 1
      order.append(Op('B', backward))
      backward += 1
    orders.append(order)
  return orders


def timetable(orders: Sequence[Sequence[Op]]) -> list[list[Op | None]]:
  """[tick][stage] -> the op each stage runs at each tick (None: idle), every op as early as its inputs
  allow and in its stage's order."""
  n_stages = len(orders)
  done: dict[tuple[str, int, int], int] = {}  # (kind, micro, stage) -> tick it ran
  position = [0] * n_stages
  ticks: list[list[Op | None]] = []
  while any(position[s] < len(orders[s]) for s in range(n_stages)):
    tick = len(ticks)
    row: list[Op | None] = [None] * n_stages
    for s in range(n_stages):
      if position[s] == len(orders[s]):
        continue
      op = orders[s][position[s]]
      if op.kind == 'F':
        needs = [('F', op.micro, s - 1)] if s > 0 else []
      else:
        needs = [('F', op.micro, s)] + ([('B', op.micro, s + 1)] if s < n_stages - 1 else [])
      if all(done.get(need, tick) < tick for need in needs):
        row[s] = op
    for s, op in enumerate(row):
      if op is not None:
        done[(op.kind, op.micro, s)] = tick
        position[s] += 1
    if not any(row):
      raise ValueError(f'schedule deadlocks at tick {tick}: every stage waits for an input no stage will produce')
    ticks.append(row)
  return ticks


def bubble_fraction(table: Sequence[Sequence[Op | None]], costs: dict[str, float] | None = None) -> float:
  """Idle share of stage-time. Lockstep ticks last as long as their slowest op (costs: time per op kind,
  default F = B = 1)."""
  costs = costs or {'F': 1.0, 'B': 1.0}
  span = sum(max((costs[op.kind] for op in row if op is not None), default=0.0) for row in table)
  busy = sum(costs[op.kind] for row in table for op in row if op is not None)
  return 1 - busy / (span * len(table[0]))


def peak_activations(table: Sequence[Sequence[Op | None]]) -> list[int]:
  """Per stage, the most microbatches whose forward has run and whose backward has not: activations held."""
  peaks = []
  for s in range(len(table[0])):
    held = peak = 0
    for row in table:
      op = row[s]
      if op is not None:
        held += 1 if op.kind == 'F' else -1
        peak = max(peak, held)
    peaks.append(peak)
  return peaks
