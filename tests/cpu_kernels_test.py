"""The native CPU kernels against float64 references (a projection, the official per-expert loop), their
gradients, and their build."""

import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from deepseek_jax import cpu_kernels
from deepseek_jax import grouped_matmul as gm
from tests.helpers import require_native


def official(x_XD, experts_XK, weights_XK, w1, w2, w3):
  """inference/model.py MoE.forward's routed sum in float64: y[idx] += expert(x[idx]) * weights[idx, top]."""
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  x, weights, w1, w2, w3 = map(f64, (x_XD, weights_XK, w1, w2, w3))
  experts = np.asarray(experts_XK)
  y = np.zeros_like(x)
  for e in range(w1.shape[0]):
    idx, top = np.where(experts == e)
    if len(idx):
      g = x[idx] @ w1[e]
      y[idx] += ((g / (1 + np.exp(-g)) * (x[idx] @ w3[e])) @ w2[e]) * weights[idx, top, None]
  return y


def host(x_XD, experts_XK, weights_XK, w1, w2, w3):
  """The same sum through grouped_matmul's exact host layout (the kernel's gradient path in moe.py)."""
  d = gm.plan(experts_XK, w1.shape[0], 'host')
  rows = gm.gather(d, x_XD)
  gate, up = gm.matmuls(d, rows, (w1, w3))
  return gm.combine(d, gm.matmul(d, jax.nn.silu(gate) * up, w2), weights_XK)


def problem(seed, x, k, e, d, i, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x_XD = rng.standard_normal((x, d)).astype(np.float32)
  x_XD[x // 2] *= 40.0  # an outlier token
  experts_XK = np.stack([rng.choice(e, k, replace=False) for _ in range(x)]).astype(np.int32)
  weights_XK = rng.uniform(0.1, 1.0, (x, k)).astype(np.float32)
  ws = [(rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        for shape in ((e, d, i), (e, i, d), (e, d, i))]
  ws[0][0, 0, :] *= 30.0  # an outlier weight row
  return (jnp.asarray(x_XD), jnp.asarray(experts_XK), jnp.asarray(weights_XK),
          *(jnp.asarray(w, dtype) for w in ws))


class RoutedExpertsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    require_native()

  @parameterized.parameters(
      (1, 4, 16, 256, 128),  # one decode row: 4 experts with one row each
      (8, 4, 16, 256, 128),  # the demo's batch-8 step
      (33, 3, 6, 64, 32),  # more rows per expert than one register block; experts without rows
      (7, 2, 5, 40, 24),  # widths that are not a multiple of the 16-float vectors
  )
  def test_matches_official_loop(self, x, k, e, d, i):
    args = problem(x, x, k, e, d, i)
    got = jax.jit(lambda *a: cpu_kernels.routed_swiglu(*a, host))(*args)
    want = official(*args)
    # fp32 products against float64: the error of a 256-term fp32 dot product, relative to the largest value.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())

  def test_bfloat16_weights_read_as_stored(self):
    args = problem(3, 8, 4, 16, 64, 48, jnp.bfloat16)
    got = jax.jit(lambda *a: cpu_kernels.routed_swiglu(*a, host))(*args)
    want = official(*args)  # the bf16 values, exactly, in float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())

  def test_copies_for_other_devices_add_nothing(self):
    # Expert parallelism: ids outside [0, E) are computed elsewhere, whatever their gate weight.
    x_XD, experts, weights, w1, w2, w3 = problem(4, 6, 3, 8, 32, 16)
    elsewhere = experts.at[0, 1].set(8).at[3, 0].set(11).at[5, 2].set(-1)
    got = cpu_kernels.routed_swiglu(x_XD, elsewhere, weights, w1, w2, w3, host)
    kept = jnp.where((elsewhere >= 0) & (elsewhere < 8), weights, 0.0)
    want = official(x_XD, jnp.clip(elsewhere, 0, 7), kept, w1, w2, w3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())

  def test_same_bits_every_call(self):
    # Experts run on whichever thread claims them; each copy has its own output row and the gate-weighted sum
    # runs in k order after, so the bits never depend on the schedule.
    args = problem(5, 32, 4, 16, 128, 64)
    fn = jax.jit(lambda *a: cpu_kernels.routed_swiglu(*a, host))
    first = np.asarray(fn(*args))
    for _ in range(5):
      np.testing.assert_array_equal(fn(*args), first)

  def test_gradient_is_the_reference_path(self):
    args = problem(6, 12, 3, 8, 32, 16)
    cot = jax.random.normal(jax.random.key(0), (12, 32))
    loss = lambda fn: lambda x, g, a, b, c: jnp.sum(fn(x, args[1], g, a, b, c) * cot)
    got = jax.grad(loss(lambda *a: cpu_kernels.routed_swiglu(*a, host)), argnums=range(5))(*args[:1], *args[2:])
    want = jax.grad(loss(host), argnums=range(5))(*args[:1], *args[2:])
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())

  def test_vmap(self):
    x_XD, experts, weights, w1, w2, w3 = problem(7, 5, 2, 4, 32, 16)
    both = jax.vmap(lambda w: cpu_kernels.routed_swiglu(x_XD, experts, weights, w, w2, w3, host))(
        jnp.stack([w1, -w1]))
    for got, w in zip(both, (w1, -w1)):
      want = official(x_XD, experts, weights, w, w2, w3)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())

  def test_bad_shapes_name_the_tensor(self):
    x_XD, experts, weights, w1, w2, w3 = problem(8, 4, 2, 4, 32, 16)
    with self.assertRaisesRegex(ValueError, r'w2 has shape \(4, 32, 32\), expected \(4, 16, 32\)'):
      cpu_kernels.routed_swiglu(x_XD, experts, weights, w1, jnp.zeros((4, 32, 32)), w3, host)
    with self.assertRaisesRegex(ValueError, 'all float32 or all bfloat16'):
      cpu_kernels.routed_swiglu(x_XD, experts, weights, w1, w2.astype(jnp.bfloat16), w3, host)


class LinearTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    require_native()

  @parameterized.product(rows=(1, 5, 6, 7, 32), shape=((256, 4096), (768, 256), (40, 24)),
                         dtype=(jnp.float32, jnp.bfloat16))
  def test_matches_float64(self, rows, shape, dtype):
    # Row counts around the 6-row register block; a width that is not a multiple of the 16-float vectors.
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, shape[0])).astype(np.float32)
    x[0, 3] = 500.0  # an outlier
    w = jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), dtype)
    got = jax.jit(lambda x, w: cpu_kernels.matmul(x, w, None))(jnp.asarray(x), w)
    want = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())

  def test_leading_dims_and_gradient(self):
    x = jax.random.normal(jax.random.key(0), (2, 3, 64))
    w = jax.random.normal(jax.random.key(1), (64, 48))
    xla = lambda x, w: jnp.dot(x, w)
    np.testing.assert_allclose(cpu_kernels.matmul(x, w, xla), xla(x, w), rtol=1e-5, atol=1e-5)
    cot = jax.random.normal(jax.random.key(2), (2, 3, 48))
    got = jax.grad(lambda x, w: jnp.sum(cpu_kernels.matmul(x, w, xla) * cot), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(xla(x, w) * cot), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
      np.testing.assert_array_equal(g, r)  # the reference's own backward

  def test_auto_by_rows_backend_and_mesh(self):
    w = jnp.zeros((8, 8))
    self.assertTrue(cpu_kernels.native_linear('auto', cpu_kernels.LINEAR_ROWS, w))
    self.assertFalse(cpu_kernels.native_linear('auto', cpu_kernels.LINEAR_ROWS + 1, w))
    self.assertFalse(cpu_kernels.native_linear('auto', 1, w.astype(jnp.float16)))
    self.assertFalse(cpu_kernels.native_linear('xla', 1, w))
    self.assertTrue(cpu_kernels.native_linear('native', 4096, w))
    mesh = jax.make_mesh((len(jax.devices()),), ('data',))
    with jax.set_mesh(mesh):  # the partitioner would replicate a custom call: XLA's dots under a mesh
      self.assertFalse(cpu_kernels.native_linear('auto', 1, w))


class BuildTest(absltest.TestCase):

  def test_a_failing_compiler_leaves_xla_in_charge(self):
    # A fresh process (available() is cached per process) with a compiler that always fails and an empty
    # cache: the kernel reports itself unavailable with the compiler's command, and 'auto' keeps XLA's layouts.
    code = ('from deepseek_jax import cpu_kernels, grouped_matmul as gm\n'
            'import jax.numpy as jnp\n'
            'print(cpu_kernels.available(), gm.resolve("auto", 8, 4, 16, "cpu"), '
            'cpu_kernels.native_linear("auto", 1, jnp.zeros((4, 4))))\n'
            'try:\n  cpu_kernels._build()\nexcept cpu_kernels.Unavailable as e:\n  print("unavailable:", e)\n')
    env = dict(os.environ, CXX='false', DEEPSEEK_JAX_CACHE=self.create_tempdir().full_path)
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertEqual(out.returncode, 0, out.stderr)
    lines = out.stdout.splitlines()
    self.assertEqual(lines[0], 'False dense False')
    self.assertIn('unavailable: compiling the native CPU kernels failed', lines[1])
    self.assertIn('the native CPU kernels are unavailable', out.stderr)

  def test_an_unwritable_cache_falls_back_to_the_temporary_directory(self):
    # The cache's parent is a file, so it cannot be created: the build goes to the system's temporary
    # directory (the compiler fails here, so the error names the command and its output path, and nothing
    # is left there).
    parent = self.create_tempfile().full_path
    code = ('from deepseek_jax import cpu_kernels\n'
            'try:\n  cpu_kernels._build()\nexcept cpu_kernels.Unavailable as e:\n  print(e)\n')
    env = dict(os.environ, CXX='false', DEEPSEEK_JAX_CACHE=os.path.join(parent, 'cache'))
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self.assertEqual(out.returncode, 0, out.stderr)
    self.assertIn(f' -o {os.path.join(tempfile.gettempdir(), f"deepseek_jax-{os.getuid()}")}{os.sep}', out.stdout)

  def test_built_once_per_machine(self):
    require_native()
    first = cpu_kernels._build()
    self.assertTrue(first.exists())
    mtime = first.stat().st_mtime_ns
    self.assertEqual(cpu_kernels._build(), first)  # the cached library, not a rebuild
    self.assertEqual(first.stat().st_mtime_ns, mtime)


if __name__ == '__main__':
  absltest.main()
