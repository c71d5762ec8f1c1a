"""Expert dispatch: equality with the per-expert definition, gradients, and cost independent of the expert count."""

import functools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from deepseek_jax import grouped_matmul as gm
from deepseek_jax import host_gmm
from tests.helpers import require_native


def routed_ffn(x_XD, experts_XK, weights_XK, w_EDO, impl):
  d = gm.plan(experts_XK, w_EDO.shape[0], impl)
  return gm.combine(d, gm.matmul(d, gm.gather(d, x_XD), gm.read(d, w_EDO)), weights_XK)


def reference_ffn(x_XD, experts_XK, weights_XK, w_EDO):
  """Per copy: weights[x, k] * x[x] @ w[experts[x, k]]."""
  return jnp.einsum('xk,xko->xo', weights_XK, jnp.einsum('xd,xkdo->xko', x_XD, w_EDO[experts_XK]))


def problem(key, x=40, k=3, d=24, o=16, e=6):
  kx, kw, ke, kg = jax.random.split(key, 4)
  x_XD = jax.random.normal(kx, (x, d)).at[5].mul(50.0)  # an outlier token
  w_EDO = jax.random.normal(kw, (e, d, o))
  # Experts 1 and 4 get nothing: empty groups must work.
  experts_XK = jax.vmap(lambda key: jax.random.choice(key, jnp.array([0, 2, 3, 5]), (k,), replace=False))(
      jax.random.split(ke, x)).astype(jnp.int32)
  return x_XD, experts_XK, jax.random.uniform(kg, (x, k)), w_EDO


class DispatchTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('host', 'tiled', 'ragged_dot', 'gather', 'dense')
  def test_matches_reference(self, impl):
    x, experts, weights, w = problem(jax.random.key(0))
    got = self.variant(lambda *a: routed_ffn(*a, impl))(x, experts, weights, w)
    np.testing.assert_allclose(got, reference_ffn(x, experts, weights, w), rtol=1e-5, atol=1e-3)

  @parameterized.parameters('host', 'tiled', 'ragged_dot', 'gather', 'dense')
  def test_gradients(self, impl):
    x, experts, weights, w = problem(jax.random.key(1))
    cot = jax.random.normal(jax.random.key(2), (x.shape[0], w.shape[-1]))
    got = jax.grad(lambda *a: jnp.sum(routed_ffn(*a[:2], a[2], a[3], impl) * cot), argnums=(0, 2, 3))(
        x, experts, weights, w)
    want = jax.grad(lambda *a: jnp.sum(reference_ffn(*a) * cot), argnums=(0, 2, 3))(x, experts, weights, w)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-3)

  @parameterized.parameters('host', 'tiled', 'ragged_dot', 'gather', 'dense')
  def test_copies_for_other_devices_are_left_out(self, impl):
    # Expert parallelism: this device holds experts 0-2 of 6; ids 3-5 arrive as 3 ("elsewhere") with a zero
    # gate weight and must contribute nothing, in value or gradient.
    x, experts, weights, w = problem(jax.random.key(5))
    mine = experts < 3
    local_experts, local_weights = jnp.where(mine, experts, 3), jnp.where(mine, weights, 0.0)
    want = reference_ffn(x, jnp.where(mine, experts, 0), local_weights, w)
    got = jax.jit(lambda *a: routed_ffn(*a, impl))(x, local_experts, local_weights, w[:3])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    d_w = jax.grad(lambda w3: routed_ffn(x, local_experts, local_weights, w3, impl).sum())(w[:3])
    want_d_w = jax.grad(lambda w6: reference_ffn(x, jnp.where(mine, experts, 0), local_weights, w6).sum())(w)
    np.testing.assert_allclose(d_w, want_d_w[:3], rtol=1e-5, atol=1e-3)

  def test_reference_matmul_on_sorted_rows(self):
    rows = jax.random.normal(jax.random.key(3), (10, 4))
    w = jax.random.normal(jax.random.key(4), (3, 4, 2))
    sizes = jnp.array([4, 0, 6])
    want = jnp.concatenate([rows[:4] @ w[0], rows[4:] @ w[2]])
    np.testing.assert_allclose(gm.reference_matmul(rows, w, sizes), want, rtol=1e-6)
    np.testing.assert_allclose(jax.lax.ragged_dot(rows, w, sizes), want, rtol=1e-6)

  def test_host_multiplies_each_copy_once(self):
    # Every product the host callbacks run, counted in one forward + backward: exactly the routed copies this
    # device holds (no padding rows, nothing for the copies of other devices' experts), x 3 GEMMs.
    x, experts, weights, w = problem(jax.random.key(6), x=300, e=64)
    experts = jax.random.randint(jax.random.key(7), experts.shape, 0, 80)  # ids 64-79: elsewhere
    weights = jnp.where(experts < 64, weights, 0.0)
    with host_gmm.counting_multiply_adds() as counted:
      jax.block_until_ready(jax.jit(jax.grad(lambda *a: routed_ffn(*a, 'host').sum(), argnums=(0, 2, 3)))(
          x, experts, weights, w))
    mine = int((experts < 64).sum())
    self.assertLess(mine, experts.size)
    self.assertEqual(counted[0], 3 * mine * w.shape[1] * w.shape[2])

  def test_host_writes_every_output_element(self):
    # The host loop writes into XLA's uninitialised output buffers: poisoned with NaN here, value and gradients
    # must still equal the reference with experts that get no rows (1 and 4) and copies for another device's
    # experts.
    x, experts, weights, w = problem(jax.random.key(9))
    mine = experts < 3
    local_experts, local_weights = jnp.where(mine, experts, 3), jnp.where(mine, weights, 0.0)
    loss = lambda f, x, w: jnp.sum(f(x, w) ** 2)
    host = lambda x, w3: routed_ffn(x, local_experts, local_weights, w3, 'host')
    reference = lambda x, w6: reference_ffn(x, jnp.where(mine, experts, 0), local_weights, w6)
    def poisoned(buffers):
      views = [np.asarray(b) for b in buffers]
      for view in views:
        view[...] = np.nan
      return views

    with mock.patch.object(host_gmm, '_outputs', poisoned):
      got = jax.jit(jax.value_and_grad(functools.partial(loss, host), argnums=(0, 1)))(x, w[:3])
    want = jax.value_and_grad(functools.partial(loss, reference), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1][0], want[1][0], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(got[1][1], want[1][1][:3], rtol=1e-5, atol=1e-2)

  def test_host_bf16_and_vmap(self):
    x, experts, weights, w = problem(jax.random.key(8))
    want = reference_ffn(x, experts, weights, w)
    got = jax.jit(lambda *a: routed_ffn(*a, 'host'))(x.astype(jnp.bfloat16), experts, weights, w.astype(jnp.bfloat16))
    self.assertEqual(got.dtype, jnp.bfloat16)
    # bf16 rounding of the operands and the output (8 bits of mantissa): 2% of the largest output.
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.02 * float(jnp.abs(want).max()))
    two = jax.vmap(lambda w: routed_ffn(x, experts, weights, w, 'host'))(jnp.stack([w, -2 * w]))
    np.testing.assert_allclose(two[1], -2 * want, rtol=1e-5, atol=1e-3)

  @parameterized.parameters((3, 2), (5, 3), (1, 4))
  def test_dense_candidates_when_copies_are_fewer_than_experts(self, x, k):
    # M < E: only the distinct chosen experts are read (duplicates and "elsewhere" ids included).
    x_XD, _, weights, _ = problem(jax.random.key(x), x=x, k=k)
    w = jax.random.normal(jax.random.key(9), (16, x_XD.shape[1], 16))
    experts = jnp.asarray(np.random.default_rng(x).choice([2, 7, 9, 16], (x, k)), jnp.int32)  # 16: elsewhere
    experts = experts.at[0, 0].set(16)
    weights = jnp.where(experts < 16, weights, 0.0)
    d = gm.plan(experts, 16, 'dense')
    self.assertEqual(d.candidates_C.shape, (x * k,))
    want = reference_ffn(x_XD, jnp.minimum(experts, 15), weights, w)
    np.testing.assert_allclose(jax.jit(lambda *a: routed_ffn(*a, 'dense'))(x_XD, experts, weights, w), want,
                               rtol=1e-5, atol=1e-3)

  def test_weight_bytes_read_at_decode_sizes(self):
    # 8 tokens x top-4 of 16 experts: dense reads each expert's weight once; gather writes and reads a copy
    # per routed copy (32), from XLA's compiled cost analysis.
    x, k, e, d, o = 8, 4, 16, 256, 128
    w_bytes = e * d * o * 4

    def accessed(impl):
      fn = lambda x_XD, experts_XK, w_EDO: routed_ffn(x_XD, experts_XK, jnp.ones((x, k)), w_EDO, impl)
      args = (jax.ShapeDtypeStruct((x, d), jnp.float32), jax.ShapeDtypeStruct((x, k), jnp.int32),
              jax.ShapeDtypeStruct((e, d, o), jnp.float32))
      return jax.jit(fn).lower(*args).compile().cost_analysis()['bytes accessed']

    activations = e * x * (d + o) * 4  # one [C, X, D] broadcast of the tokens and one [C, X, O] output
    self.assertLess(accessed('dense'), w_bytes + 4 * activations)  # the stack once; activations written, read
    self.assertGreater(accessed('gather'), 2 * (x * k / e) * w_bytes)  # 32 copies written, then read

  def test_auto_by_copies_and_tokens(self):
    for backend in ('cpu', 'gpu', 'tpu'):  # weights the native kernel cannot read (4-bit, FP8): XLA layouts
      self.assertEqual(gm.resolve('auto', 1, 4, 16, backend, native=False), 'gather')  # one row: 4 of 16 experts
      self.assertEqual(gm.resolve('auto', 8, 4, 16, backend, native=False), 'dense')  # 32 copies of 16 experts
    self.assertEqual(gm.resolve('auto', gm.DENSE_ROWS, 8, 256, 'tpu'), 'dense')
    self.assertEqual(gm.resolve('auto', gm.DENSE_ROWS, 8, 256, 'gpu'), 'dense')
    self.assertEqual(gm.resolve('auto', gm.DENSE_ROWS + 1, 8, 256, 'tpu'), 'ragged_dot')
    self.assertEqual(gm.resolve('auto', gm.DENSE_ROWS + 1, 8, 256, 'gpu'), 'tiled')
    # CPU: dense only while its X * E rows of work stay within CPU_DENSE_WORK, then the exact host loop.
    self.assertEqual(gm.resolve('auto', 16, 4, 16, 'cpu', native=False), 'host')
    self.assertEqual(gm.resolve('auto', 8, 8, 64, 'cpu', native=False), 'host')
    # CPU with float weights: the native kernel at every size (built here: required in CI).
    require_native()
    for x in (1, 8, 2048):
      self.assertEqual(gm.resolve('auto', x, 4, 16, 'cpu'), 'native')
    with self.assertRaisesRegex(ValueError, 'no dispatch layout'):
      gm.plan(jnp.zeros((2, 4), jnp.int32), 16, 'native')

  def test_tile_padding_bound(self):
    for m, g in [(8192, 16), (64, 8), (4096, 256), (100, 3), (10**6, 8)]:
      tile = gm.tile_rows(m, g)
      self.assertTrue(128 <= tile <= 256 and tile & (tile - 1) == 0)
      self.assertLessEqual(g * tile, max(m // 2, 128 * g))

  def test_cost_independent_of_expert_count(self):
    """Compiled FLOPs of a tiled expert matmul at fixed routed copies, from 8 to 64 experts."""
    x, k, d, o = 2048, 4, 128, 64

    def flops(e, impl):
      fn = lambda x_XD, experts_XK, w_EDO: routed_ffn(x_XD, experts_XK, jnp.ones((x, k)), w_EDO, impl)
      args = (jax.ShapeDtypeStruct((x, d), jnp.float32), jax.ShapeDtypeStruct((x, k), jnp.int32),
              jax.ShapeDtypeStruct((e, d, o), jnp.float32))
      return jax.jit(fn).lower(*args).compile().cost_analysis()['flops']

    ideal = 2 * x * k * d * o
    self.assertLess(flops(8, 'tiled'), 1.5 * ideal)
    self.assertLess(flops(64, 'tiled'), 2.2 * ideal)  # padding <= 128 rows per expert: 64 * 128 = M
    # Why CPU does not use ragged_dot: XLA:CPU expands it into a dense masked product over every expert.
    self.assertGreater(flops(64, 'ragged_dot') / flops(8, 'ragged_dot'), 6)
