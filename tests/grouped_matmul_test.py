"""Expert dispatch: equality with the per-expert definition, gradients, and cost independent of the expert count."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from deepseek_jax import grouped_matmul as gm


def routed_ffn(x_XD, experts_XK, weights_XK, w_EDO, impl):
  d = gm.plan(experts_XK, w_EDO.shape[0], impl)
  return gm.combine(d, gm.matmul(d, gm.gather(d, x_XD), w_EDO), weights_XK)


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
  @parameterized.parameters('tiled', 'ragged_dot', 'gather')
  def test_matches_reference(self, impl):
    x, experts, weights, w = problem(jax.random.key(0))
    got = self.variant(lambda *a: routed_ffn(*a, impl))(x, experts, weights, w)
    np.testing.assert_allclose(got, reference_ffn(x, experts, weights, w), rtol=1e-5, atol=1e-3)

  @parameterized.parameters('tiled', 'ragged_dot', 'gather')
  def test_gradients(self, impl):
    x, experts, weights, w = problem(jax.random.key(1))
    cot = jax.random.normal(jax.random.key(2), (x.shape[0], w.shape[-1]))
    got = jax.grad(lambda *a: jnp.sum(routed_ffn(*a[:2], a[2], a[3], impl) * cot), argnums=(0, 2, 3))(
        x, experts, weights, w)
    want = jax.grad(lambda *a: jnp.sum(reference_ffn(*a) * cot), argnums=(0, 2, 3))(x, experts, weights, w)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-3)

  @parameterized.parameters('tiled', 'ragged_dot', 'gather')
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

  def test_auto_picks_gather_for_few_copies(self):
    self.assertEqual(gm.resolve('auto', 64, 16), 'gather')  # decoding: B * K copies
    self.assertIn(gm.resolve('auto', 8192, 16), ('tiled', 'ragged_dot'))

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
