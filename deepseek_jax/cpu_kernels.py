"""Decode-sized matmuls on the CPU in native kernels (native/cpu_kernels.cc): projections and routed experts.

A decode step is bound by the bytes of weights it reads. XLA:CPU's matmuls with a few rows stream a weight
well below the memory's speed, and it has no grouped GEMM: its batched matmul over the experts ('dense')
multiplies every token by every expert, and 'gather' copies a weight per routed copy. The kernels load each
weight row once into vector registers against up to 6 token rows (AVX-512; 3 with AVX2), split the columns
(a projection) or the experts with rows (the routed SwiGLU, each expert read once from its stack) over the
calling thread and XLA's intra-op pool, and sum each token's gate-weighted expert outputs in k order, so the
result never depends on the threads. `bench/decode.py` has the figures against XLA's paths.

They are XLA FFI custom calls, compiled on first use with the machine's C++ compiler (`$CXX`, else g++, c++
or clang++) for this CPU (-march=native) against the FFI headers jaxlib ships, and cached under
$DEEPSEEK_JAX_CACHE (default ~/.cache/deepseek_jax) by a hash of the source, compiler, flags, jaxlib and CPU.
Without a compiler `available()` is False (the reason logged once) and everything runs through XLA;
DEEPSEEK_JAX_NATIVE=0 turns the kernels off. They have no backward pass: a differentiated call runs its
`reference` (XLA) forward and backward instead, so training costs what it did without them.

Weights are read as stored, float32 or bfloat16 (each value widened to fp32 in the fetch); activations and
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

SOURCE = Path(__file__).parent / 'native' / 'cpu_kernels.cc'
TARGETS = ('deepseek_jax_linear_cpu', 'deepseek_jax_routed_experts_cpu')  # FFI names = exported symbols
FLAGS = ('-O3', '-std=c++17', '-fPIC', '-shared', '-w')
# Code for this CPU's vector width (AVX-512 where it has it); a compiler that rejects the flag builds without.
NATIVE_FLAGS = ('-march=native',)
COMPILE_SECONDS = 300
LINEAR_IMPLS = ('auto', 'xla', 'native')
# Rows up to which 'auto' runs a projection natively: measured on 2 cores (bench/decode.py's projection table),
# XLA's GEMM catches up with the kernel's register blocks between 32 and 64 rows.
LINEAR_ROWS = 32


class Unavailable(RuntimeError):
  """The native kernels cannot be built or loaded here."""


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
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), version, ' '.join(FLAGS + NATIVE_FLAGS),
                                  importlib.metadata.version('jaxlib'), platform.machine(),
                                  _cpu_identity()]).encode()).hexdigest()[:16]
  library = cache_dir() / f'cpu_kernels-{key}.so'
  if library.exists():
    return library
  try:
    library.parent.mkdir(parents=True, exist_ok=True)
  except OSError:  # an unwritable home: the system's temporary directory instead
    library = Path(tempfile.gettempdir()) / f'deepseek_jax-{os.getuid()}' / library.name
    library.parent.mkdir(parents=True, exist_ok=True)
    if library.exists():
      return library
  errors = []
  for extra in (NATIVE_FLAGS, ()):
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix='.so.tmp', delete=False) as tmp:
      pass
    command = [compiler, *FLAGS, *extra, f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', tmp.name]
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_SECONDS)
    if result.returncode == 0:
      os.replace(tmp.name, library)
      return library
    os.unlink(tmp.name)
    errors.append(f'{" ".join(command)}:\n{result.stderr[-2000:]}')
  raise Unavailable('compiling the native CPU kernels failed:\n' + '\n'.join(errors))


@functools.cache
def _register() -> None:
  library = ctypes.cdll.LoadLibrary(str(_build()))
  for target in TARGETS:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the kernels are built and registered here (compiled on the first call on a machine)."""
  if os.environ.get('DEEPSEEK_JAX_NATIVE', '1') == '0':
    return False
  try:
    _register()
  except (Unavailable, OSError, subprocess.SubprocessError) as error:
    logging.warning('deepseek_jax: the native CPU kernels are unavailable, decoding runs through XLA: %s', error)
    return False
  return True


def usable() -> bool:
  """Whether a model traced now may call the kernels: on the CPU backend, built, and with no mesh in
  effect outside shard_map (XLA's partitioner would replicate a custom call's operands onto every device)."""
  if jax.default_backend() != 'cpu' or not available():
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or set(mesh.manual_axes) == set(mesh.axis_names)


def native_linear(impl: str, rows: int, w) -> bool:
  """Whether a projection of `rows` rows by weight w runs in the kernel: 'native' always (raising when it
  cannot), 'xla' never, 'auto' where usable() and w is float32 or bfloat16 and rows <= LINEAR_ROWS."""
  if impl not in LINEAR_IMPLS:
    raise ValueError(f'linear impl must be one of {LINEAR_IMPLS}, got {impl!r}')
  if impl == 'native' and not available():
    raise Unavailable('linear_impl=native: the native CPU kernels are unavailable here (see the warning logged)')
  if impl == 'auto':
    return rows <= LINEAR_ROWS and jnp.dtype(w.dtype) in (jnp.float32, jnp.bfloat16) and usable()
  return impl == 'native'


def _weights_dtype(name: str, *ws) -> None:
  dtypes = {jnp.dtype(w.dtype) for w in ws}
  if dtypes not in ({jnp.dtype(jnp.float32)}, {jnp.dtype(jnp.bfloat16)}):
    raise ValueError(f'{name}: weights must be all float32 or all bfloat16, got {", ".join(str(w.dtype) for w in ws)}')


def matmul(x_XA, w_AO, reference):
  """x [..., A] @ w [A, O] as float32 [..., O]. `reference(x, w)` computes it through XLA and gives the
  gradient."""
  if x_XA.shape[-1] != w_AO.shape[0] or w_AO.ndim != 2:
    raise ValueError(f'cpu_kernels.matmul: x {x_XA.shape} and w {w_AO.shape} do not multiply (want x [..., A], '
                     'w [A, O])')
  _weights_dtype('cpu_kernels.matmul', w_AO)

  def native(x, w):  # the kernel takes the rows flattened, [X, A]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return _ffi(TARGETS[0], (rows.shape[0], w.shape[1]), rows, w).reshape(*x.shape[:-1], w.shape[1])

  return _native_or_reference(native, reference, x_XA, w_AO)


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
  _weights_dtype('routed_swiglu', w1_EDI, w2_EID, w3_EDI)
  native = lambda x, experts, g, w1, w2, w3: _ffi(TARGETS[1], (x.shape[0], d), x.astype(jnp.float32),
                                                 experts.astype(jnp.int32), g.astype(jnp.float32), w1, w2, w3)
  return _native_or_reference(native, reference, x_XD, experts_XK, weights_XK, w1_EDI, w2_EID, w3_EDI)


def _ffi(target: str, shape, *args):
  if not available():
    raise Unavailable('the native CPU kernels are unavailable here (see the warning logged above)')
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method='sequential')(*args)


def _native_or_reference(native, reference, *args):
  """native(*args) where nothing is differentiated; under differentiation reference's forward (its
  residuals saved) and backward, so a training step costs what the reference path costs."""
  @jax.custom_vjp
  def call(*args):
    return native(*args)

  def forward(*args):
    return jax.vjp(lambda *a: reference(*a).astype(jnp.float32), *args)

  call.defvjp(forward, lambda vjp, dy: vjp(dy))
  return call(*args)
