"""Whole model: shapes and dtypes, causality by gradient, MTP wiring, the big configs through eval_shape."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

from deepseek_jax import cost
from deepseek_jax.block import run_layers
from deepseek_jax.config import BF16, PRESETS, Runtime
from deepseek_jax.model import DeepSeekV3
from tests.helpers import forward, mtp_forward, random_model

TINY = PRESETS['tiny']


def tokens(shape, vocab, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


class ModelTest(parameterized.TestCase):

  def test_logits_shape_and_dtype(self):
    model = DeepSeekV3(TINY, Runtime(), nnx.Rngs(0))
    logits = forward(model, tokens((2, 16), TINY.vocab_size)).logits_BTW
    chex.assert_shape(logits, (2, 16, TINY.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)

  def test_bfloat16(self):
    cfg = TINY
    model = random_model(cfg, rt=BF16)
    chex.assert_type(model.embed.embedding[...], jnp.bfloat16)
    chex.assert_type(model.moe_layers.ffn.gate.bias[...], jnp.float32)  # the router bias stays fp32
    logits = forward(model, tokens((2, 8), cfg.vocab_size)).logits_BTW
    chex.assert_type(logits, jnp.bfloat16)
    chex.assert_tree_all_finite(logits)

  def test_causal_by_gradient(self):
    model = random_model(TINY, seed=1)
    x_BTD = jax.random.normal(jax.random.key(2), (2, 12, TINY.dim))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    t = 5

    def logits_at_t(x):
      x, _, _ = run_layers(model.dense_layers, x, positions, None, model.rt)
      x, _, _ = model.moe_blocks(x, positions)
      return model.outputs(x, {}).logits_BTW[:, t].sum()

    grad_BTD = jax.jit(jax.grad(logits_at_t))(x_BTD)
    per_position = np.abs(np.asarray(grad_BTD)).sum(axis=(0, 2))
    self.assertTrue(np.all(per_position[t + 1:] == 0), per_position)  # no path from the future
    self.assertTrue(np.all(per_position[:t + 1] > 0), per_position)  # every past position matters

  def test_dense_only_and_moe_only(self):
    for cfg in (TINY.replace(n_dense_layers=3, n_mtp_layers=0), TINY.replace(n_dense_layers=0)):
      model = random_model(cfg)
      self.assertEqual(model.dense_layers is None, cfg.n_dense_layers == 0)
      self.assertEqual(model.moe_layers is None, cfg.n_moe_layers == 0)
      chex.assert_tree_all_finite(forward(model, tokens((1, 8), cfg.vocab_size)).logits_BTW)


class MTPTest(parameterized.TestCase):

  @parameterized.parameters(1, 2)
  def test_matches_hand_written(self, depth):
    cfg = TINY.replace(n_mtp_layers=depth)
    model = random_model(cfg, seed=3)
    tok = tokens((2, 10), cfg.vocab_size, seed=4)
    out = forward(model, tok)
    got = mtp_forward(model, tok).logits_PBTW
    chex.assert_shape(got, (depth, 2, 10, cfg.vocab_size))

    def rms(x, w):
      x = np.asarray(x, np.float64)
      return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(w[...], np.float64)

    emb = np.asarray(model.embed.embedding[...], np.float64)
    head = np.asarray(model.head.kernel[...], np.float64)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    h = np.asarray(out.hidden_BTD, np.float64)  # depth 1 reads the final-normed main hidden state
    tok_np = np.asarray(tok)
    for k in range(1, depth + 1):
      mtp = model.mtp[k - 1]
      next_tok = np.zeros_like(tok_np)
      next_tok[:, :-k] = tok_np[:, k:]  # token i + k at position i
      concat = np.concatenate([rms(emb[next_tok], mtp.enorm.scale), rms(h, mtp.hnorm.scale)], -1)  # embedding first
      x = concat @ np.asarray(mtp.eh_proj.kernel[...], np.float64)
      x = nnx.jit(lambda b, x, p: b(x, p)[0])(mtp.block, jnp.asarray(x, jnp.float32), positions)
      h = rms(x, mtp.shared_head_norm.scale)
      np.testing.assert_allclose(got[k - 1], h @ head, rtol=1e-4, atol=1e-4 * np.abs(h @ head).max())

  def test_mtp_positions_are_causal_in_their_inputs(self):
    model = random_model(TINY, seed=5)
    tok = tokens((1, 12), TINY.vocab_size, seed=6)
    changed = tok.at[0, 8].set((tok[0, 8] + 1) % TINY.vocab_size)

    def mtp_logits(t):
      return np.asarray(mtp_forward(model, t).logits_PBTW[0, 0])

    a, b = mtp_logits(tok), mtp_logits(changed)
    # Depth 1 at position i reads tokens <= i + 1: positions up to 6 cannot see token 8, position 7 can.
    np.testing.assert_array_equal(a[:7], b[:7])
    self.assertGreater(np.abs(a[7] - b[7]).max(), 0)


class BigConfigTest(parameterized.TestCase):

  @parameterized.parameters('tiny', 'demo', 'v2-lite-16b', 'v3-671b')
  def test_eval_shape_counts_equal_cost_model(self, name):
    cfg = PRESETS[name]
    model = nnx.eval_shape(lambda: DeepSeekV3(cfg, Runtime(), nnx.Rngs(0)))
    sizes = {path: int(np.prod(v.shape)) for path, v in nnx.to_flat_state(nnx.state(model))}
    summary = cost.summary(cfg)
    self.assertEqual(sum(n for p, n in sizes.items() if p[0] != 'mtp'), summary['total_params'])
    self.assertEqual(sum(n for p, n in sizes.items() if p[0] == 'mtp'), summary['mtp_params'])

  def test_v3_671b_shapes(self):
    cfg = PRESETS['v3-671b']
    model = nnx.eval_shape(lambda: DeepSeekV3(cfg, BF16, nnx.Rngs(0)))
    self.assertEqual(model.moe_layers.ffn.experts.w1.shape, (58, 256, 7168, 2048))
    self.assertEqual(model.dense_layers.attn.wkv_b.kernel.shape, (3, 512, 128 * 256))
    self.assertEqual(model.mtp[0].eh_proj.kernel.shape, (14336, 7168))
    logits = jax.eval_shape(lambda m, t: m(t), model, jax.ShapeDtypeStruct((1, 16), jnp.int32))
    self.assertEqual((logits.shape, logits.dtype), ((1, 16, 129280), jnp.bfloat16))
