"""Pipeline schedules: which forward / backward each device runs in which order, and the bubble each leaves.

The model's layers are cut into V chunks (pipeline stages) run in order; `placement[c]` is the device holding
chunk c. Ops act on one microbatch m and one chunk c:
  F  forward;      needs F(c - 1, m)
  B  full backward (input and weight gradients); needs F(c, m) and B(c + 1, m)
  I  input-gradient half of a split backward (zero-bubble style); needs what B needs
  W  weight-gradient half, deferred to fill a bubble; needs I(c, m)
Each device runs its `order` one slot after another; a slot is one op or an overlapped forward-backward pair
(DualPipe's F&B: one chunk's compute hides the other's all-to-all).

  GPipe:     every forward, then every backward.            bubble (P - 1)(F + B), M activations held
  1F1B:      P - d - 1 warm-up forwards, then alternate.     bubble (P - 1)(F + B), P - d held
  DualPipeV: 2P chunks in a V (device d holds chunks d and 2P - 1 - d, so the embedding, the output head and
             MTP share device 0), the eight phases of deepseek-ai/DualPipe `dualpipev.py` with overlapped
             pairs and zero-bubble weight chunks.               bubble (P - 1)(F&B + B - 3W) in chunk times

`simulate` runs a schedule as real devices would (each slot starts once its device is free and its inputs
are done) to measure the bubble against those formulas. `timetable` places the same orders on lockstep ticks
for the SPMD engine (pipeline.py), where every device steps through one slot per tick.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence


class Op(NamedTuple):
  kind: str  # 'F', 'B', 'I' or 'W'
  chunk: int
  micro: int


Slot = tuple  # one Op, or an (F, B) pair run overlapped


class Schedule(NamedTuple):
  name: str
  n_devices: int
  n_micro: int
  placement: tuple[int, ...]  # chunk -> device
  orders: tuple[tuple[Slot, ...], ...]  # per device, its slots in order

  @property
  def n_chunks(self) -> int:
    return len(self.placement)

  def local_chunks(self, device: int) -> list[int]:
    """The chunks a device holds, in the order they are stored on it."""
    return [c for c, d in enumerate(self.placement) if d == device]


def gpipe(n_devices: int, n_micro: int) -> Schedule:
  """Every forward, then every backward (in reverse, as autodiff runs them)."""
  orders = tuple(tuple((Op('F', d, m),) for m in range(n_micro)) +
                 tuple((Op('B', d, m),) for m in reversed(range(n_micro))) for d in range(n_devices))
  return Schedule('gpipe', n_devices, n_micro, tuple(range(n_devices)), orders)


def one_f_one_b(n_devices: int, n_micro: int) -> Schedule:
  """Device d: min(P - d - 1, M) warm-up forwards, then one forward one backward, then the last backwards."""
  orders = []
  for d in range(n_devices):
    warmup = min(n_devices - d - 1, n_micro)
    order = [(Op('F', d, m),) for m in range(warmup)]
    for m in range(n_micro):
      if warmup + m < n_micro:
        order.append((Op('F', d, warmup + m),))
      order.append((Op('B', d, m),))
    orders.append(tuple(order))
  return Schedule('1f1b', n_devices, n_micro, tuple(range(n_devices)), tuple(orders))


def dualpipe_v(n_devices: int, n_micro: int) -> Schedule:
  """DualPipeV, transcribed from `DualPipeV.step` (deepseek-ai/DualPipe, dualpipe/dualpipev.py).

  Phase 0 of device d is chunk d (down the devices), phase 1 is chunk 2P - 1 - d (back up). Needs M >= 2P.
  """
  p = n_devices
  if n_micro < 2 * p:
    raise ValueError(f'DualPipeV needs at least 2 x {p} devices = {2 * p} microbatches, got {n_micro}')
  orders = []
  for d in range(p):
    chunk = (d, 2 * p - 1 - d)
    counters = {}
    deferred = []  # input-gradient halves whose weight half runs later, oldest first

    def op(kind, phase, zero_bubble=False):
      key = ('B' if kind == 'B' else 'F', phase)
      m = counters.get(key, 0)
      counters[key] = m + 1
      if kind == 'B' and zero_bubble:
        deferred.append(Op('W', chunk[phase], m))
        return Op('I', chunk[phase], m)
      return Op(kind, chunk[phase], m)

    order = []
    single = lambda *args: order.append((op(*args),))
    weight = lambda: order.append((deferred.pop(0),))
    for _ in range(2 * (p - d - 1)):  # 1: nF0
      single('F', 0)
    for _ in range(d + 1):  # 2: nF0F1
      single('F', 0)
      single('F', 1)
    for _ in range(p - d - 1):  # 3: nB1W1F1, zero bubble
      single('B', 1, True)
      weight()
      single('F', 1)
    for i in range(n_micro - 2 * p + d + 1):  # 4: nF0B1F1B0, the main overlapped phase
      if i == 0 and d == p - 1:  # the reference keeps this first pair apart
        single('F', 0)
        single('B', 1)
      else:
        order.append((op('F', 0), op('B', 1)))
      order.append((op('F', 1), op('B', 0)))
    for _ in range(p - d - 1):  # 5: nB1F1B0
      single('B', 1)
      order.append((op('F', 1), op('B', 0)))
    zero_bubble = False
    for i in range(d + 1):  # 6: nB1B0, zero bubble from the middle on
      if i == (d + 1) // 2 and d % 2 == 1:
        zero_bubble = True
      single('B', 1, zero_bubble)
      if i == (d + 1) // 2 and d % 2 == 0:
        zero_bubble = True
      single('B', 0, zero_bubble)
    for _ in range(p - d - 1):  # 7: nWB0
      weight()
      single('B', 0, True)
    while deferred:  # 8: nW
      weight()
    orders.append(tuple(order))
  placement = tuple(c if c < p else 2 * p - 1 - c for c in range(2 * p))
  return Schedule('dualpipev', p, n_micro, placement, tuple(orders))


SCHEDULES = {'gpipe': gpipe, '1f1b': one_f_one_b, 'dualpipev': dualpipe_v}


def needs(op: Op, n_chunks: int) -> list[tuple[str, int, int]]:
  """(kind, chunk, micro) of the ops whose results `op` reads; a backward counts as done once its input
  gradient is (B or I)."""
  if op.kind == 'F':
    return [('F', op.chunk - 1, op.micro)] if op.chunk else []
  if op.kind == 'W':
    return [('BI', op.chunk, op.micro)]
  return [('F', op.chunk, op.micro)] + ([('BI', op.chunk + 1, op.micro)] if op.chunk < n_chunks - 1 else [])


def _key(op: Op) -> tuple[str, int, int]:
  return ('BI' if op.kind in 'BI' else op.kind, op.chunk, op.micro)


def check(schedule: Schedule) -> None:
  """Every F and backward of every (chunk, microbatch) exactly once, on the chunk's device; W after its I."""
  seen = {}
  for d, order in enumerate(schedule.orders):
    for slot in order:
      for op in slot:
        if schedule.placement[op.chunk] != d:
          raise ValueError(f'{schedule.name}: {op} runs on device {d}, its chunk lives on {schedule.placement[op.chunk]}')
        seen[op] = seen.get(op, 0) + 1
  ops = [Op(k, c, m) for k in 'FB' for c in range(schedule.n_chunks) for m in range(schedule.n_micro)]
  for op in ops:
    split = seen.get(Op('I', op.chunk, op.micro), 0), seen.get(Op('W', op.chunk, op.micro), 0)
    count = seen.get(op, 0) if op.kind == 'F' or split == (0, 0) else (1 if split == (1, 1) else 0)
    if count != 1:
      raise ValueError(f'{schedule.name}: {op} runs {count} times')


def timetable(schedule: Schedule) -> list[list[Slot | None]]:
  """[tick][device] -> the slot each device runs at each tick (None: idle), every slot as early as its inputs
  (all finished at earlier ticks) allow and in its device's order."""
  done: dict[tuple[str, int, int], int] = {}
  position = [0] * schedule.n_devices
  ticks: list[list[Slot | None]] = []
  while any(position[d] < len(order) for d, order in enumerate(schedule.orders)):
    tick = len(ticks)
    row: list[Slot | None] = [None] * schedule.n_devices
    for d, order in enumerate(schedule.orders):
      if position[d] < len(order):
        slot = order[position[d]]
        if all(done.get(need, tick) < tick for op in slot for need in needs(op, schedule.n_chunks)):
          row[d] = slot
    if not any(row):
      raise ValueError(f'{schedule.name} deadlocks at tick {tick}: every device waits for an input')
    for d, slot in enumerate(row):
      if slot is not None:
        position[d] += 1
        for op in slot:
          done[_key(op)] = tick
    ticks.append(row)
  return ticks


def simulate(schedule: Schedule, costs: dict[str, float]) -> tuple[float, list[float]]:
  """(makespan, idle time per device) when each slot starts as soon as its device is free and its inputs are
  done. costs: 'F', 'B' (a full backward), 'W' (its weight half: I costs B - W), optionally 'F&B' for an
  overlapped pair (default F + B: no overlap)."""
  cost = lambda op: costs['F'] if op.kind == 'F' else costs['W'] if op.kind == 'W' else (
      costs['B'] - costs['W'] if op.kind == 'I' else costs['B'])
  finish: dict[tuple[str, int, int], float] = {}
  free = [0.0] * schedule.n_devices
  busy = [0.0] * schedule.n_devices
  position = [0] * schedule.n_devices
  remaining = sum(len(order) for order in schedule.orders)
  while remaining:
    progressed = False
    for d, order in enumerate(schedule.orders):
      while position[d] < len(order):
        slot = order[position[d]]
        inputs = [need for op in slot for need in needs(op, schedule.n_chunks)]
        if not all(need in finish for need in inputs):
          break
        start = max([free[d]] + [finish[need] for need in inputs])
        length = costs.get('F&B', costs['F'] + costs['B']) if len(slot) == 2 else cost(slot[0])
        free[d] = start + length
        busy[d] += length
        for op in slot:
          finish[_key(op)] = free[d]
        position[d] += 1
        remaining -= 1
        progressed = True
    if not progressed:
      raise ValueError(f'{schedule.name} deadlocks: every device waits for an input')
  makespan = max(free)
  return makespan, [makespan - b for b in busy]


def bubble_fraction(schedule: Schedule, costs: dict[str, float]) -> float:
  """Idle share of device-time in `simulate`."""
  makespan, idle = simulate(schedule, costs)
  return sum(idle) / (makespan * schedule.n_devices)


def peak_activations(table: Sequence[Sequence[Slot | None]]) -> list[int]:
  """Per device, the most (chunk, microbatch) forwards whose backward has not run yet: activations held."""
  peaks = []
  for d in range(len(table[0])):
    held = peak = 0
    for row in table:
      for op in row[d] or ():
        held += 1 if op.kind == 'F' else -1 if op.kind in 'BI' else 0
        peak = max(peak, held)
    peaks.append(peak)
  return peaks
