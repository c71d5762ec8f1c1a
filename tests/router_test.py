"""The DeepSeekMoE gate against a per-token transcription of the official Gate.forward (inference/model.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from deepseek_jax.config import PRESETS
from deepseek_jax.router import route

V3_LIKE = PRESETS['tiny'].replace(n_routed_experts=32, n_expert_groups=8, n_limited_groups=4,
                                  n_activated_experts=8, route_scale=2.5)
CONFIGS = {
    'sigmoid_groups': V3_LIKE,
    # What from_official builds for a sigmoid config narrower than 7168: no bias, so groups score by their max.
    'sigmoid_groups_no_bias': V3_LIKE.replace(router_bias=False),
    'sigmoid_one_group': V3_LIKE.replace(n_expert_groups=1, n_limited_groups=1),
    'softmax_groups': V3_LIKE.replace(score_func='softmax', router_bias=False, n_activated_experts=6,
                                      route_scale=16.0),
    'softmax_no_groups': V3_LIKE.replace(score_func='softmax', router_bias=False, n_expert_groups=1,
                                         n_limited_groups=1, n_activated_experts=6, route_scale=1.0),
}


def official_gate(logits, bias, cfg):
  """DeepSeek-V3 inference/model.py Gate.forward (9b4e978), one token at a time, float64."""
  weights, indices = [], []
  for row in np.asarray(logits, np.float64):
    if cfg.score_func == 'softmax':
      scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    else:
      scores = 1 / (1 + np.exp(-row))
    original = scores.copy()
    if bias is not None:
      scores = scores + bias
    g = cfg.n_expert_groups
    if g > 1:
      grouped = scores.reshape(g, -1)
      # Official: `if self.bias is None: amax else: topk(2).sum`.
      group_scores = grouped.max(-1) if bias is None else np.sort(grouped, axis=-1)[:, -2:].sum(-1)
      keep = np.argsort(-group_scores, kind='stable')[:cfg.n_limited_groups]
      masked = np.full_like(grouped, -np.inf)
      masked[keep] = grouped[keep]
      scores = masked.reshape(-1)
    idx = np.argsort(-scores, kind='stable')[:cfg.n_activated_experts]
    w = original[idx]
    if cfg.score_func == 'sigmoid':
      w = w / w.sum()
    weights.append(w * cfg.route_scale)
    indices.append(idx)
  return np.array(weights), np.array(indices)


def random_logits(key, n, e):
  logits = 2.0 * jax.random.normal(key, (n, e))
  return logits.at[::7, 3].set(12.0)  # outlier tokens that strongly prefer one expert


class RouterTest(parameterized.TestCase):

  @parameterized.named_parameters(*CONFIGS.items())
  def test_matches_official(self, cfg):
    logits = random_logits(jax.random.key(0), 64, cfg.n_routed_experts)
    bias = 0.3 * jax.random.normal(jax.random.key(1), (cfg.n_routed_experts,)) if cfg.router_bias else None
    got = route(logits, bias, cfg)
    want_w, want_i = official_gate(logits, None if bias is None else np.asarray(bias, np.float64), cfg)
    order = np.argsort(np.asarray(got.experts_XK), axis=-1)  # top-k order is irrelevant; compare as sets
    want_order = np.argsort(want_i, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(got.experts_XK), order, -1),
                                  np.take_along_axis(want_i, want_order, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(got.weights_XK), order, -1),
                               np.take_along_axis(want_w, want_order, -1), rtol=1e-5)

  @parameterized.named_parameters(*CONFIGS.items())
  def test_invariants(self, cfg):
    e, g = cfg.n_routed_experts, cfg.n_expert_groups
    logits = random_logits(jax.random.key(2), 128, e)
    # A strongly negative bias makes every biased score negative: a 0.0 group mask would then prefer experts
    # of dropped groups, the -inf mask never does.
    bias = -5.0 + 0.1 * jax.random.normal(jax.random.key(3), (e,)) if cfg.router_bias else None
    r = jax.jit(route, static_argnums=2)(logits, bias, cfg)
    experts = np.asarray(r.experts_XK)
    chex.assert_shape(experts, (128, cfg.n_activated_experts))
    self.assertTrue(all(len(set(row)) == cfg.n_activated_experts for row in experts))  # exactly top-k, distinct
    select = np.asarray(r.scores_XE) + (0 if bias is None else np.asarray(bias))
    for t in range(128):  # chosen experts lie in kept groups, and kept groups are the best by group score
      grouped = select[t].reshape(g, -1)
      group_score = grouped.max(-1) if bias is None else np.sort(grouped, -1)[:, -2:].sum(-1)
      kept = set(np.argsort(-group_score)[:cfg.n_limited_groups])
      self.assertTrue({x // (e // g) for x in experts[t]} <= kept)
    weights = np.asarray(r.weights_XK)
    unbiased = np.take_along_axis(np.asarray(r.scores_XE), experts, -1)
    if cfg.renormalize_topk:
      np.testing.assert_allclose(weights.sum(-1), cfg.route_scale, rtol=1e-5)  # weights sum to route_scale
      np.testing.assert_allclose(weights, cfg.route_scale * unbiased / unbiased.sum(-1, keepdims=True), rtol=1e-5)
    else:
      np.testing.assert_allclose(weights, cfg.route_scale * unbiased, rtol=1e-6)  # unbiased scores, not biased

  def test_bias_steers_selection_only(self):
    cfg = CONFIGS['sigmoid_one_group']
    logits = random_logits(jax.random.key(4), 16, cfg.n_routed_experts)
    bias = jnp.zeros(cfg.n_routed_experts).at[5].set(10.0)
    r = route(logits, bias, cfg)
    self.assertTrue(np.all(np.any(np.asarray(r.experts_XK) == 5, axis=-1)))  # expert 5 always chosen ...
    # ... but its weight is its unbiased sigmoid score, renormalised.
    r0 = route(logits, None, cfg)
    np.testing.assert_allclose(r.scores_XE, r0.scores_XE)

  def test_gradient_reaches_logits_through_weights(self):
    cfg = CONFIGS['sigmoid_groups']
    logits = random_logits(jax.random.key(5), 8, cfg.n_routed_experts)
    grad = jax.grad(lambda l: (route(l, None, cfg).weights_XK ** 2).sum())(logits)
    self.assertGreater(float(jnp.abs(grad).max()), 0)
