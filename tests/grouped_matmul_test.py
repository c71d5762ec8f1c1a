"""Grouped matmul: equality with the per-group definition, gradients, and cost independent of the group count."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from deepseek_jax.grouped_matmul import gmm, gmm_reference, gmm_tiled, tile_rows


def problem(key, m=96, p=24, o=16, sizes=(0, 40, 3, 0, 29, 24)):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (m, p)).at[5, :].mul(50.0)  # an outlier row
  w = jax.random.normal(kw, (len(sizes), p, o))
  assert sum(sizes) == m
  return x, w, jnp.array(sizes, jnp.int32)


class GroupedMatmulTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('tiled', 'ragged_dot')
  def test_matches_reference(self, impl):
    x, w, sizes = problem(jax.random.key(0))
    got = self.variant(lambda x, w, s: gmm(x, w, s, impl))(x, w, sizes)
    np.testing.assert_allclose(got, gmm_reference(x, w, sizes), rtol=1e-5, atol=1e-4)

  @parameterized.parameters(8, 16, 128)
  def test_tiles_smaller_and_larger_than_groups(self, tile):
    x, w, sizes = problem(jax.random.key(1))
    np.testing.assert_allclose(gmm_tiled(x, w, sizes, tile=tile), gmm_reference(x, w, sizes), rtol=1e-5, atol=1e-4)

  @parameterized.parameters('tiled', 'ragged_dot')
  def test_gradients(self, impl):
    x, w, sizes = problem(jax.random.key(2))
    cot = jax.random.normal(jax.random.key(3), (x.shape[0], w.shape[-1]))
    got = jax.grad(lambda x, w: jnp.sum(gmm(x, w, sizes, impl) * cot), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(gmm_reference(x, w, sizes) * cot), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-3)

  def test_tile_padding_bound(self):
    for m, g in [(8192, 16), (64, 8), (4096, 256), (100, 3)]:
      tile = tile_rows(m, g)
      self.assertTrue(8 <= tile <= 128 and tile & (tile - 1) == 0)
      self.assertTrue(g * tile <= max(m // 4, 8 * g))  # padding below M/4 unless the 8-row floor binds

  def test_cost_independent_of_group_count(self):
    """Compiled FLOPs of the tiled gmm stay flat from 4 to 64 experts at fixed routed rows."""
    m, p, o = 4096, 128, 64

    def flops(g, impl):
      args = (jax.ShapeDtypeStruct((m, p), jnp.float32), jax.ShapeDtypeStruct((g, p, o), jnp.float32),
              jax.ShapeDtypeStruct((g,), jnp.int32))
      return jax.jit(lambda x, w, s: gmm(x, w, s, impl)).lower(*args).compile().cost_analysis()['flops']

    tiled = flops(64, 'tiled') / flops(4, 'tiled')
    self.assertLess(tiled, 1.5)
    # Why CPU does not use ragged_dot: XLA:CPU expands it into a dense masked product over every group.
    self.assertGreater(flops(64, 'ragged_dot') / flops(4, 'ragged_dot'), 8)
