"""Timing of compiled functions for the benchmarks."""

import statistics
import time


def compiled_seconds(f, *args, runs: int = 9) -> float:
  """Median seconds of f(*args) (a jitted function; waits for its results) over `runs` runs after a warm-up
  run that compiles it."""
  import jax
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def median_step_seconds(runs: dict, steps: int, pause: float = 0.5) -> dict:
  """Median seconds of each step function, timed in turn (one step of each per round, after 2 warm-up
  steps each), so a drift in the machine's speed falls on all of them alike. Each timed step starts after
  `pause` seconds idle: PyTorch's OpenMP threads keep spinning on the cores for a while after its ops end,
  and measured here (bench/step_profile.py) a jitted step started straight after a PyTorch step took
  1,203 ms against 1,071 ms with the spinning turned off (OMP_WAIT_POLICY=PASSIVE, which slows PyTorch
  itself 1.65x, so it is not set)."""
  for run_step in runs.values():
    for _ in range(2):
      run_step()
  times = {name: [] for name in runs}
  for _ in range(steps):
    for name, run_step in runs.items():
      time.sleep(pause)
      start = time.perf_counter()
      run_step()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
