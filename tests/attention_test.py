"""Causal attention for MLA's shapes: blockwise flash (XLA) and TPU splash (interpret mode) against the dense
reference, outputs and all five gradients; the compiled step's temporaries linear in T for flash where the
dense form's grow with T^2; the model trained with flash equals the model with dense attention."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from deepseek_jax import attention, sharding
from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.loss import loss_fn
from tests.helpers import random_model

SCALE = 0.2


def inputs(b, t, h, n, r, v, seed=0, dtype=jnp.float32):
  """(q_nope, q_pe, k_nope, k_pe shared by the heads, v) with outlier query rows."""
  ks = jax.random.split(jax.random.key(seed), 6)
  q_nope = jax.random.normal(ks[0], (b, t, h, n)) * jnp.exp(jax.random.normal(ks[5], (b, t, h, 1)))
  shapes = ((b, t, h, r), (b, t, h, n), (b, t, r), (b, t, h, v))
  return [a.astype(dtype) for a in [q_nope] + [jax.random.normal(k, s) for k, s in zip(ks[1:5], shapes)]]


def outputs_and_grads(fn, args):
  """The attention output and the gradient of <output, w> for a fixed random w, for every input."""
  out = fn(*args)
  w = jax.random.normal(jax.random.key(7), out.shape)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w), argnums=tuple(range(5)))(*args)
  return out, grads


def assert_close(test, got, want, rel):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    test.assertEqual(g.shape, w.shape)
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0, atol=rel * np.abs(w).max())


def dense(*args):
  return attention.dense(*args, SCALE)


class FlashTest(parameterized.TestCase):

  @parameterized.parameters((64, 16), (50, 16), (16, 16), (40, 64))  # whole blocks, padded, one block, T < block
  def test_equals_dense(self, t, block):
    args = inputs(2, t, 3, 16, 8, 12)
    got = outputs_and_grads(lambda *a: attention.causal(*a, SCALE, 'flash', block), args)
    assert_close(self, got, outputs_and_grads(dense, args), 1e-5)  # fp32: summation order only

  def test_bf16(self):
    args = inputs(1, 48, 2, 16, 8, 16, dtype=jnp.bfloat16)
    got = outputs_and_grads(lambda *a: attention.causal(*a, SCALE, 'flash', 16), args)
    # Both round probabilities and gradient products to bf16 (8 bits), in different blocks.
    assert_close(self, got, outputs_and_grads(dense, args), 2e-2)

  def test_step_memory_is_linear_in_t(self):
    h, n, r, v = 4, 32, 16, 32

    def temporaries(impl, t):
      specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, t, h, n), (1, t, h, r), (1, t, h, n), (1, t, r),
                                                             (1, t, h, v))]
      step = jax.jit(jax.grad(lambda *a: jnp.sum(attention.causal(*a, SCALE, impl, 256)), argnums=tuple(range(5))))
      return step.trace(*specs).lower().compile().memory_analysis().temp_size_in_bytes

    flash = [temporaries('flash', t) for t in (1024, 2048, 4096)]
    # Linear: each doubling adds twice the previous increment (a + bT), here within 10% (no T^2 term).
    self.assertAlmostEqual((flash[2] - flash[1]) / (flash[1] - flash[0]), 2.0, delta=0.2)
    dense_ = [temporaries('dense', t) for t in (1024, 2048)]
    self.assertGreater(dense_[1] / dense_[0], 3.5)  # the [B, H, T, T] scores and probabilities
    self.assertLess(flash[2], dense_[0])


class SplashTest(absltest.TestCase):
  """The TPU kernel in interpret mode (its block rules need 128-multiples: T 256, blocks of 128)."""

  def test_equals_dense(self):
    args = inputs(2, 256, 2, 128, 64, 128)
    got = outputs_and_grads(lambda *a: attention.splash(*a, SCALE, interpret=True, block=128), args)
    # The kernel takes q pre-scaled, one more fp32 rounding: with |scores| up to ~400 on these outlier rows
    # that moves a score, and so its probability relatively, by up to 400 x 2^-24 = 2.4e-5.
    assert_close(self, got, outputs_and_grads(dense, args), 1e-4)

  def test_on_a_mesh_each_device_runs_its_sequences(self):
    args = inputs(2, 256, 1, 128, 64, 128, seed=1)
    mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
      got = jax.jit(lambda *a: attention.splash(*a, SCALE, interpret=True, block=128))(*args)
    assert_close(self, got, dense(*args), 1e-4)  # as above


class ModelTest(absltest.TestCase):

  def test_flash_trains_as_dense(self):
    cfg = PRESETS['tiny']
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)))

    def loss_and_grads(rt):
      graphdef, params, rest = nnx.split(random_model(cfg, seed=2, rt=rt), nnx.Param, ...)
      return jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), tokens).total))(params)

    # Blocks of 16 rows: 40 tokens pad to 48, three query blocks (MTP's attention included).
    got = loss_and_grads(Runtime(attention='flash', attention_block=16))
    assert_close(self, got, loss_and_grads(Runtime(attention='dense')), 1e-5)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'Runtime.attention'):
      Runtime(attention='ring')
    with self.assertRaisesRegex(ValueError, 'Runtime.attention_block'):
      Runtime(attention_block=0)


if __name__ == '__main__':
  absltest.main()
