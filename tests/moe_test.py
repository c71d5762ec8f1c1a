"""MoE layer against the official per-expert loop, and the balance-loss statistics against Eq. 17-20."""

import jax
import numpy as np
from absl.testing import parameterized
from flax import nnx

from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.moe import MoE
from tests.helpers import randomize
from tests.router_test import official_gate

CFG = PRESETS['tiny'].replace(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
GATES = {  # the official gate's three regimes
    'sigmoid_bias': CFG,
    'sigmoid_no_bias': CFG.replace(router_bias=False),  # groups score by their max
    'softmax': CFG.replace(score_func='softmax', router_bias=False, route_scale=1.0),
}


def make_moe(cfg, seed=0, rt=Runtime()):
  return randomize(nnx.eval_shape(lambda: MoE(cfg, rt, nnx.Rngs(0))), seed)


def official_moe(moe, x_XD, cfg):
  """inference/model.py MoE.forward in float64: the gate (official_gate), then y[idx] += expert(x[idx]) *
  weights[idx, top] for each expert, then + shared experts."""
  p = lambda v: np.asarray(v[...], np.float64)
  x = np.asarray(x_XD, np.float64)
  bias = None if moe.gate.bias is None else p(moe.gate.bias)
  weights, indices = official_gate(x @ p(moe.gate.weight), bias, cfg)
  w1, w2, w3 = (p(getattr(moe.experts, n)) for n in ('w1', 'w2', 'w3'))
  silu = lambda z: z / (1 + np.exp(-z))
  swiglu = lambda x, w1, w2, w3: (silu(x @ w1) * (x @ w3)) @ w2
  y = np.zeros_like(x)
  for i in range(cfg.n_routed_experts):
    idx, top = np.where(indices == i)
    if len(idx):
      y[idx] += swiglu(x[idx], w1[i], w2[i], w3[i]) * weights[idx, top, None]
  shared = moe.shared_experts
  return y + swiglu(x, p(shared.w1.kernel), p(shared.w2.kernel), p(shared.w3.kernel))


class MoETest(parameterized.TestCase):

  @parameterized.product(impl=('host', 'tiled', 'ragged_dot', 'gather'), gate=tuple(GATES))
  def test_matches_official_loop(self, impl, gate):
    cfg = GATES[gate]
    moe = make_moe(cfg, rt=Runtime(gmm_impl=impl))
    if moe.gate.bias is not None:  # a nonzero bias, so that selection and weights differ
      moe.gate.bias.set_value(0.3 * jax.random.normal(jax.random.key(2), (cfg.n_routed_experts,)))
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
    # The routing of the official gate (tests/router_test.py), and its unbiased sigmoid scores.
    logits = np.asarray(x_BTD, np.float64).reshape(-1, cfg.dim) @ np.asarray(moe.gate.weight[...], np.float64)
    _, chosen = official_gate(logits, np.asarray(moe.gate.bias[...], np.float64), cfg)
    chosen = chosen.reshape(b, t, k)
    scores = (1 / (1 + np.exp(-logits))).reshape(b, t, e)
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
