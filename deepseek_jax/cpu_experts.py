"""The routed experts of one MoE layer in one native CPU kernel (native/routed_experts_cpu.cc), for decoding.

A decode step is bound by the bytes of expert weights it reads. XLA:CPU has no grouped GEMM: its batched
matmul over the experts ('dense') multiplies every token by every expert and streams the weights at about
12 GB/s on 2 cores whatever the rows, and 'gather' copies a weight per routed copy. The kernel groups the
copies by expert and reads each expert that has rows once, straight from its stack, SwiGLU included, then
sums each token's gate-weighted outputs in k order (so threads do not change the result). Measured on the
demo's shapes (16 experts of 256 x 128, top-4, fp32, 2 cores), three MoE layers at 8 tokens: 0.40 ms against
1.27 ms for 'dense' (bench/decode.py has the decode figures).

The kernel is an XLA FFI custom call compiled on first use with the machine's C++ compiler (`$CXX`, else g++,
c++ or clang++) for this CPU (-march=native) against the FFI headers jaxlib ships, and cached under
$DEEPSEEK_JAX_CACHE (default ~/.cache/deepseek_jax) by a hash of the source, compiler, flags, jaxlib and CPU.
Without a compiler, `available()` is False (the reason logged once) and the 'auto' dispatch keeps XLA's
layouts; DEEPSEEK_JAX_NATIVE=0 turns the kernel off. The kernel has no backward pass: a differentiated call
runs the `reference` path (grouped_matmul's exact host layout, moe.py) forward and backward instead.

Weights are read as stored, float32 or bfloat16 (each value widened to fp32 in the fetch); tokens and
results are float32, products accumulate in float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

SOURCE = Path(__file__).parent / 'native' / 'routed_experts_cpu.cc'
TARGET = 'deepseek_jax_routed_experts_cpu'
SYMBOL = 'deepseek_routed_experts_cpu'
FLAGS = ('-O3', '-std=c++17', '-fPIC', '-shared', '-w')
# Code for this CPU's vector width (AVX-512 where it has it); a compiler that rejects the flag builds without.
NATIVE_FLAGS = ('-march=native',)
COMPILE_SECONDS = 300


class Unavailable(RuntimeError):
  """The native kernel cannot be built or loaded here."""


def cache_dir() -> Path:
  default = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'deepseek_jax'
  return Path(os.environ.get('DEEPSEEK_JAX_CACHE', default))


def _compiler() -> str:
  for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  raise Unavailable('no C++ compiler found (set $CXX, or install g++ or clang++)')


def _cpu_identity() -> str:
  """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform."""
  try:
    lines = Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  return '\n'.join(sorted({line for line in lines if line.startswith(('model name', 'flags', 'Features'))}))


def _build() -> Path:
  """The compiled library's path, compiling it if this machine has no copy yet (written under a temporary
  name and renamed: concurrent first uses each compile and the last rename wins, never a partial file)."""
  compiler = _compiler()
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=60).stdout
  include = jax.ffi.include_dir()
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), version, ' '.join(FLAGS + NATIVE_FLAGS),
                                  importlib.metadata.version('jaxlib'), platform.machine(),
                                  _cpu_identity()]).encode()).hexdigest()[:16]
  library = cache_dir() / f'routed_experts_cpu-{key}.so'
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  errors = []
  for extra in (NATIVE_FLAGS, ()):
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix='.so.tmp', delete=False) as tmp:
      pass
    command = [compiler, *FLAGS, *extra, f'-I{include}', str(SOURCE), '-o', tmp.name]
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_SECONDS)
    if result.returncode == 0:
      os.replace(tmp.name, library)
      return library
    os.unlink(tmp.name)
    errors.append(f'{" ".join(command)}:\n{result.stderr[-2000:]}')
  raise Unavailable('compiling the native expert kernel failed:\n' + '\n'.join(errors))


@functools.cache
def _register() -> None:
  library = ctypes.cdll.LoadLibrary(str(_build()))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, SYMBOL)), platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered here (compiled on the first call on a machine)."""
  if os.environ.get('DEEPSEEK_JAX_NATIVE', '1') == '0':
    return False
  try:
    _register()
  except (Unavailable, OSError, subprocess.SubprocessError) as error:
    logging.warning('deepseek_jax: the native CPU expert kernel is unavailable, the routed experts run '
                    'through XLA: %s', error)
    return False
  return True


def routed_swiglu(x_XD, experts_XK, weights_XK, w1_EDI, w2_EID, w3_EDI, reference):
  """sum_k weights[x, k] * (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e] with e = experts[x, k], float32 [X, D].
  Expert ids outside [0, E) are copies computed elsewhere: they add nothing. `reference(x, experts,
  weights, w1, w2, w3)` computes the same through XLA and gives the gradient."""
  e, d, i = w1_EDI.shape
  x, k = experts_XK.shape
  for name, array, want in (('x', x_XD, (x, d)), ('weights', weights_XK, (x, k)), ('w3', w3_EDI, (e, d, i)),
                            ('w2', w2_EID, (e, i, d))):
    if array.shape != want:
      raise ValueError(f'routed_swiglu: {name} has shape {array.shape}, expected {want} (x [X, D], experts and '
                       f'weights [X, K], w1 and w3 [E, D, I], w2 [E, I, D], from w1 {w1_EDI.shape} and experts '
                       f'{experts_XK.shape})')
  dtypes = {jnp.dtype(w.dtype) for w in (w1_EDI, w2_EID, w3_EDI)}
  if dtypes not in ({jnp.dtype(jnp.float32)}, {jnp.dtype(jnp.bfloat16)}):
    raise ValueError(f'routed_swiglu: w1, w2, w3 must be all float32 or all bfloat16, got '
                     f'{w1_EDI.dtype}, {w2_EID.dtype}, {w3_EDI.dtype}')
  return _routed(reference, x_XD, experts_XK, weights_XK, w1_EDI, w2_EID, w3_EDI)


def _call(x_XD, experts_XK, weights_XK, w1, w2, w3):
  if not available():
    raise Unavailable('the native CPU expert kernel is unavailable here (see the warning logged above)')
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x_XD.shape, jnp.float32), vmap_method='sequential')(
      x_XD.astype(jnp.float32), experts_XK.astype(jnp.int32), weights_XK.astype(jnp.float32), w1, w2, w3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _routed(reference, x_XD, experts_XK, weights_XK, w1, w2, w3):
  return _call(x_XD, experts_XK, weights_XK, w1, w2, w3)


def _routed_fwd(reference, x_XD, experts_XK, weights_XK, w1, w2, w3):
  """Differentiated (training): the reference's forward and its saved residuals, so a training step costs
  what the reference path costs and the kernel runs only where nothing is differentiated."""
  y_XD, vjp = jax.vjp(lambda x, g, a, b, c: reference(x, experts_XK, g, a, b, c).astype(jnp.float32),
                      x_XD, weights_XK, w1, w2, w3)
  return y_XD, vjp


def _routed_bwd(reference, vjp, dy_XD):
  dx, dweights, d1, d2, d3 = vjp(dy_XD)
  return dx, None, dweights, d1, d2, d3


_routed.defvjp(_routed_fwd, _routed_bwd)
