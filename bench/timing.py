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
