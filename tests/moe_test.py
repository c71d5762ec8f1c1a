"""MoE layer against the official per-expert loop, and the balance-loss statistics against Eq. 17-20."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

from deepseek_jax.config import PRESETS
from deepseek_jax.moe import MoE
from tests.helpers import randomize

CFG = PRESETS['tiny'].replace(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)


def make_moe(cfg, seed=0):
  return randomize(nnx.eval_shape(lambda: MoE(cfg, nnx.Rngs(0))), seed)


def official_moe(moe, x_XD, cfg):
  """inference/model.py MoE.forward: y[idx] += expert(x[idx]) * weights[idx, top]; then + shared experts."""
  routing = moe.gate(x_XD)
  weights, indices = np.asarray(routing.weights_XK), np.asarray(routing.experts_XK)
  x = np.asarray(x_XD, np.float64)
  w1, w2, w3 = (np.asarray(getattr(moe.experts, n)[...], np.float64) for n in ('w1', 'w2', 'w3'))
  silu = lambda z: z / (1 + np.exp(-z))
  y = np.zeros_like(x)
  for i in range(cfg.n_routed_experts):
    idx, top = np.where(indices == i)
    if len(idx):
      y[idx] += (silu(x[idx] @ w1[i]) * (x[idx] @ w3[i])) @ w2[i] * weights[idx, top, None]
  return y + np.asarray(moe.shared_experts(x_XD), np.float64)


class MoETest(parameterized.TestCase):

  @parameterized.parameters('tiled', 'ragged_dot', 'gather')
  def test_matches_official_loop(self, impl):
    cfg = CFG.replace(gmm_impl=impl)
    moe = make_moe(cfg)
    x_BTD = jax.random.normal(jax.random.key(1), (3, 20, cfg.dim)).at[0, 4].mul(30.0)
    y_BTD, stats = nnx.jit(lambda m, x: m(x))(moe, x_BTD)
    want = official_moe(moe, x_BTD.reshape(-1, cfg.dim), cfg).reshape(y_BTD.shape)
    np.testing.assert_allclose(y_BTD, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    self.assertEqual(int(stats.counts_E.sum()), 3 * 20 * cfg.n_activated_experts)  # dropless: every copy counted

  def test_balance_stats(self):
    cfg = CFG
    moe = make_moe(cfg, seed=2)
    b, t, e, k = 2, 24, cfg.n_routed_experts, cfg.n_activated_experts
    x_BTD = jax.random.normal(jax.random.key(3), (b, t, cfg.dim))
    _, stats = moe(x_BTD)
    routing = moe.gate(x_BTD.reshape(-1, cfg.dim))
    chosen = np.asarray(routing.experts_XK).reshape(b, t, k)
    scores = np.asarray(routing.scores_XE, np.float64).reshape(b, t, e)
    for seq in range(b):  # Eq. 18-20, one sequence at a time
      f = np.array([(e / (k * t)) * np.sum(chosen[seq] == i) for i in range(e)])
      p = (scores[seq] / scores[seq].sum(-1, keepdims=True)).mean(0)
      np.testing.assert_allclose(stats.load_BE[seq], f, rtol=1e-6)
      np.testing.assert_allclose(stats.prob_BE[seq], p, rtol=1e-5)
    np.testing.assert_array_equal(stats.counts_E, np.bincount(chosen.reshape(-1), minlength=e))

  def test_no_shared_experts(self):
    cfg = CFG.replace(n_shared_experts=0)
    moe = make_moe(cfg)
    self.assertIsNone(moe.shared_experts)
    x_BTD = jax.random.normal(jax.random.key(4), (1, 8, cfg.dim))
    y_BTD, _ = moe(x_BTD)
    routing = moe.gate(x_BTD.reshape(-1, cfg.dim))
    np.testing.assert_allclose(y_BTD.reshape(-1, cfg.dim),
                               moe.experts(x_BTD.reshape(-1, cfg.dim), routing.experts_XK, routing.weights_XK))
