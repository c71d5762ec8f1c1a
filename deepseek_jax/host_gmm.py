"""The grouped matmul on the CPU backend: each expert's rows times its weight in one BLAS call, on the host.

XLA:CPU has no grouped GEMM: it expands `lax.ragged_dot` into a dense masked product over every group (work
x E), and rows padded per expert to 128-256-row tiles add E x tile rows of work, while smaller tiles run its
batched matmul far below dense speed. A loop over experts that hands each one its c_e sorted rows does
exactly M x A x O multiply-adds for any E, the loop the official `MoE.forward` and transformers' eager
`DeepseekV3MoE` run. `matmul(rows_MA, ws, group_sizes_E)` takes several weights sharing the rows (w1 and w3
of SwiGLU) so the rows cross into the host once. A custom VJP runs the backward pass the same way: d_rows
= sum_j dy_j @ w_j[e]^T and dw_j[e] = rows^T dy_j over each expert's rows.

The callback is `jax.experimental.buffer_callback`: numpy views of XLA's own input and output buffers, so
nothing is copied across (`jax.pure_callback` copies every operand in and every result out: measured here,
110 us a call with no data, 1.4 ms with a 16 MB weight operand, against 4 us for either through
buffer_callback). Operands cross as fp32 (numpy's bf16 matmul has no BLAS path): bf16 inputs are cast up
before and the results cast down after, fp32 accumulation as XLA's bf16 dots on CPU. Rows past sum(group_sizes_E)
(copies computed on another device under expert parallelism) come out zero, as `lax.ragged_dot`'s do.
The callback's multiply-adds are not in XLA's `cost_analysis()`: they are M x A x O per weight by
construction.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from jax.experimental.buffer_callback import buffer_callback


def _host(buffer) -> np.ndarray:
  """A numpy view of a buffer the callback receives (no copy)."""
  return np.asarray(buffer)


@functools.cache
def _blas() -> threadpoolctl.ThreadpoolController:
  return threadpoolctl.ThreadpoolController()


def _one_blas_thread(fn):
  """Run fn with numpy's BLAS on one thread. XLA:CPU runs other ops (and other callbacks) beside a callback:
  measured on the demo model's loss and gradient at 8 experts (2 cores), 1,197 ms with a 2-thread OpenBLAS
  against 966 ms with one thread."""
  @functools.wraps(fn)
  def run(*args):
    with _blas().limit(limits=1, user_api='blas'):
      return fn(*args)
  return run


def _gemm(a_ZA, b_AO, out=None):
  """Every product the host loop runs (one place to count them: `counting_multiply_adds`)."""
  return np.matmul(a_ZA, b_AO, out=out)


@contextlib.contextmanager
def counting_multiply_adds():
  """Yields a one-element list that sums the multiply-adds of every product the host loop runs inside the
  block (XLA's cost analysis does not see into a callback; bench/train_throughput.py and the tests count)."""
  global _gemm
  count, gemm, lock = [0], _gemm, threading.Lock()

  def counted(a_ZA, b_AO, out=None):
    with lock:  # the products run on several threads
      count[0] += a_ZA.shape[0] * a_ZA.shape[1] * b_AO.shape[1]
    return gemm(a_ZA, b_AO, out)

  _gemm = counted
  try:
    yield count
  finally:
    _gemm = gemm


# The experts' slices are split over this many host threads, each with a one-thread BLAS (rows and weight
# gradients of different experts are disjoint: no two threads write the same output). Measured on 2 cores
# (demo model, loss + gradient + AdamW, 16 x 128 tokens): 962 -> 905 ms at 8 experts, 1,225 -> 1,055 ms at
# 64 with two threads instead of one; numpy's own 2-thread BLAS was slower than one thread (above).
THREADS = len(os.sched_getaffinity(0))
# Below this many rows the split costs more than it saves: measured alone on 2 cores (16 experts, w1 and w3 of
# width 256 x 128), one thread 191 us against two 261 us at 32 rows, 939 against 1,061 at 512.
THREAD_ROWS = 1024


@functools.cache
def _pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix='host_gmm')


def _over_threads(run, segments):
  """run(part) on each of up to THREADS parts of the segments holding about equal rows (largest segment
  first into the lightest part), in parallel; on this thread alone below THREAD_ROWS rows."""
  n = min(THREADS, len(segments)) if segments and segments[-1][2] >= THREAD_ROWS else 1
  if n <= 1:
    return run(segments)
  parts, rows = [[] for _ in range(n)], [0] * n
  for segment in sorted(segments, key=lambda s: s[2] - s[1], reverse=True):
    i = rows.index(min(rows))
    parts[i].append(segment)
    rows[i] += segment[2] - segment[1]
  list(_pool(n).map(run, parts))


def _outputs(buffers) -> list[np.ndarray]:
  """Writable views of the callback's output buffers: uninitialised (XLA's memory), each byte written below
  (a test fills them with NaN first)."""
  return [_host(b) for b in buffers]


def _segments(group_sizes_E):
  """(expert, first row, end row) of each expert with rows, in the sorted layout."""
  ends_E = np.cumsum(np.asarray(group_sizes_E, np.int64))
  return [(e, int(end - size), int(end)) for e, (size, end) in enumerate(zip(np.asarray(group_sizes_E), ends_E))
          if size > 0]


@_one_blas_thread
def _forward_host(outs, rows_MA, group_sizes_E, *ws_EAO):
  rows_MA, segments = _host(rows_MA), _segments(_host(group_sizes_E))
  filled = segments[-1][2] if segments else 0
  ws_EAO, outs_MO = list(map(_host, ws_EAO)), _outputs(outs)
  for out_MO in outs_MO:
    out_MO[filled:] = 0

  def run(part):
    for w_EAO, out_MO in zip(ws_EAO, outs_MO):
      for e, start, end in part:
        _gemm(rows_MA[start:end], w_EAO[e], out=out_MO[start:end])

  _over_threads(run, segments)


@_one_blas_thread
def _backward_host(outs, rows_MA, group_sizes_E, *ws_and_cotangents):
  rows_MA, segments = _host(rows_MA), _segments(_host(group_sizes_E))
  filled = segments[-1][2] if segments else 0
  n = len(ws_and_cotangents) // 2
  ws_EAO, dys_MO = list(map(_host, ws_and_cotangents[:n])), list(map(_host, ws_and_cotangents[n:]))
  # Written in place below (no memset of what the products overwrite): zeros past the groups and for experts
  # without rows.
  d_rows_MA, *d_ws = _outputs(outs)
  d_rows_MA[filled:] = 0
  idle = np.setdiff1d(np.arange(ws_EAO[0].shape[0]), [e for e, _, _ in segments])
  for d_w_EAO in d_ws:
    d_w_EAO[idle] = 0

  def run(part):
    for e, start, end in part:
      rows_ZA, d_rows_ZA = rows_MA[start:end], d_rows_MA[start:end]
      for j, (w_EAO, dy_MO, d_w_EAO) in enumerate(zip(ws_EAO, dys_MO, d_ws)):
        if j == 0:
          _gemm(dy_MO[start:end], w_EAO[e].T, out=d_rows_ZA)
        else:
          d_rows_ZA += _gemm(dy_MO[start:end], w_EAO[e].T)
        _gemm(rows_ZA.T, dy_MO[start:end], out=d_w_EAO[e])

  _over_threads(run, segments)


def _call(fn, shapes, *args):
  """fn(output buffers, *input buffers) on the host, writing every output in place."""
  out = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
  return buffer_callback(lambda ctx, outs, *ins: fn(outs, *ins), out, vmap_method='sequential')(*args)


@jax.custom_vjp
def _matmul_f32(rows_MA, ws_EAO, group_sizes_E):
  shapes = [(rows_MA.shape[0], w.shape[-1]) for w in ws_EAO]
  return tuple(_call(_forward_host, shapes, rows_MA, group_sizes_E, *ws_EAO))


def _fwd(rows_MA, ws_EAO, group_sizes_E):
  return _matmul_f32(rows_MA, ws_EAO, group_sizes_E), (rows_MA, ws_EAO, group_sizes_E)


def _bwd(residuals, d_outs):
  rows_MA, ws_EAO, group_sizes_E = residuals
  grads = _call(_backward_host, [rows_MA.shape] + [w.shape for w in ws_EAO], rows_MA, group_sizes_E, *ws_EAO,
                *d_outs)
  return grads[0], tuple(grads[1:]), None


_matmul_f32.defvjp(_fwd, _bwd)


def matmul(rows_MA, ws_EAO, group_sizes_E):
  """(rows of expert e @ w[e] for w in ws_EAO) on expert-sorted rows: group e is the next group_sizes_E[e]
  rows; rows past the groups give zeros."""
  dtypes = [jnp.result_type(rows_MA, w) for w in ws_EAO]
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  outs = _matmul_f32(f32(rows_MA), tuple(map(f32, ws_EAO)), group_sizes_E.astype(jnp.int32))
  return tuple(o.astype(dt) for o, dt in zip(outs, dtypes))
