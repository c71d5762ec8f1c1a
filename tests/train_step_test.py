"""The optimizer and the train step: AdamW details, the sign-rule bias update, the non-finite guard."""

import functools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl.testing import absltest, parameterized
from flax import nnx

from deepseek_jax.config import PRESETS
from deepseek_jax.loss import loss_fn
from deepseek_jax.optimizer import adamw, scale_by_adam
from deepseek_jax.router import RouterBias, update_router_bias
from deepseek_jax.train_step import Hyper, init_train_state, train_step
from tests.helpers import random_model

TINY = PRESETS['tiny']


def hyper(lr=1e-3, gamma=1e-3, mtp_lambda=0.3, alpha=1e-4):
  return Hyper(*(jnp.float32(v) for v in (lr, gamma, mtp_lambda, alpha)))


def flat(state):
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


class OptimizerTest(parameterized.TestCase):

  def test_adam_matches_optax_in_fp32(self):
    params = {'w': jnp.array([[1.0, -2.0], [0.5, 3.0]]), 'b': jnp.array([0.1, -0.1])}
    ours, ref = scale_by_adam(0.9, 0.95, 1e-8, jnp.float32), optax.scale_by_adam(0.9, 0.95, 1e-8)
    s1, s2 = ours.init(params), ref.init(params)
    for i in range(4):
      grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)) * 10.0 ** (i - 2), params)
      u1, s1 = ours.update(grads, s1)
      u2, s2 = ref.update(grads, s2)
      chex.assert_trees_all_close(u1, u2, rtol=1e-6)

  def test_moments_are_bf16(self):
    params = {'w': jnp.ones((3, 3))}
    state = adamw().init(params)
    moments = state[1]
    chex.assert_trees_all_equal_dtypes(moments.mu, {'w': jnp.ones((), jnp.bfloat16)})
    chex.assert_trees_all_equal_dtypes(moments.nu, {'w': jnp.ones((), jnp.bfloat16)})

  def test_weight_decay_skips_norms_and_clip_bounds_the_step(self):
    model = random_model(TINY)
    params = nnx.state(model, nnx.Param)
    tx = adamw(weight_decay=0.1)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, jax.jit(tx.init)(params), params)
    for path, u in flat(updates).items():
      p = flat(params)[path]
      if path[-1] == 'scale':
        np.testing.assert_array_equal(u, 0.0, err_msg=str(path))  # norms: no decay
      else:
        np.testing.assert_allclose(u, 0.1 * p, rtol=1e-6, err_msg=str(path))  # decoupled decay, before lr
    # Our adamw clips before the moments: after one step mu = (1 - b1) * the gradient clipped to norm 1.
    tx = adamw(clip_norm=1.0)
    for scale, want_norm in ((1e6, 1.0), (1e-3, None)):  # a huge gradient is clipped, a small one is not
      grads = {'w': scale * jnp.arange(12.0).reshape(3, 4), 'b': -scale * jnp.ones((5,))}
      _, opt_state = jax.jit(tx.update)(grads, tx.init(grads), grads)
      mu = opt_state[1].mu
      want = want_norm or float(optax.tree.norm(grads))
      self.assertAlmostEqual(float(optax.tree.norm(mu)) / (0.1 * want), 1.0, delta=1e-2)  # bf16 moments
      np.testing.assert_allclose(mu['w'] / mu['w'][0, 1], grads['w'] / grads['w'][0, 1], rtol=1e-2)  # direction


class RouterBiasTest(parameterized.TestCase):

  def test_sign_rule(self):
    model = random_model(TINY)
    bias = nnx.state(model, RouterBias)
    before = flat(bias)
    rows = np.array([[10, 2, 6, 6, 0, 8, 12, 4],  # mean load 6 in every row; each layer gets its own row
                     [0, 12, 6, 6, 8, 2, 4, 10],
                     [6, 6, 6, 6, 1, 11, 3, 9]])
    counts = {'moe_layers/ffn': jnp.asarray(rows[:2]), 'mtp/0/block/ffn': jnp.asarray(rows[2])}
    after = flat(update_router_bias(bias, counts, 0.01))
    step = 0.01 * np.sign(6 - rows)  # overloaded experts go down by gamma, underloaded up, balanced stay
    main, mtp = ('moe_layers', 'ffn', 'gate', 'bias'), ('mtp', 0, 'block', 'ffn', 'gate', 'bias')
    np.testing.assert_allclose(after[main] - before[main], step[:2], atol=1e-7)
    np.testing.assert_allclose(after[mtp] - before[mtp], step[2], atol=1e-7)

  def test_counts_must_match_the_router_biases(self):
    bias = nnx.state(random_model(TINY), RouterBias)
    counts = {'moe_layers/ffn': jnp.ones((2, 8)), 'mtp/0/block/ffn': jnp.ones((8,))}
    with self.assertRaisesRegex(ValueError, 'mtp/0/block/ffn/gate/bias'):
      update_router_bias(bias, {'moe_layers/ffn': counts['moe_layers/ffn']}, 0.01)
    with self.assertRaisesRegex(ValueError, 'shape'):
      update_router_bias(bias, {**counts, 'moe_layers/ffn': jnp.ones((3, 8))}, 0.01)
    with self.assertRaisesRegex(ValueError, 'no router bias'):
      update_router_bias(bias, {**counts, 'moe_layers/extra': jnp.ones((8,))}, 0.01)


class TrainStepTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):  # one compiled step for the whole class
    super().setUpClass()
    cls.model = random_model(TINY, seed=3)
    cls.tx = adamw()
    cls.graphdef, cls.state = init_train_state(cls.model, cls.tx)
    cls.step = staticmethod(jax.jit(functools.partial(train_step, cls.graphdef, cls.tx)))
    cls.tokens = jax.random.randint(jax.random.key(4), (1, 4, 17), 1, TINY.vocab_size)

  def test_bias_moves_only_by_the_sign_rule(self):
    counts = nnx.jit(lambda m, t: loss_fn(m, t).expert_counts)(
        nnx.merge(self.graphdef, self.state.params, self.state.bias), self.tokens[0])
    new, metrics = self.step(self.state, self.tokens, hyper(gamma=0.01))
    self.assertTrue(bool(metrics['ok']))
    want = flat(update_router_bias(self.state.bias, counts, 0.01))
    chex.assert_trees_all_close(flat(new.bias), want, atol=1e-7)
    # With gamma = 0 the bias is untouched although every Param moved: AdamW never sees it.
    frozen, _ = self.step(self.state, self.tokens, hyper(gamma=0.0))
    chex.assert_trees_all_equal(flat(frozen.bias), flat(self.state.bias))
    moved = [np.any(a != b) for a, b in zip(flat(frozen.params).values(), flat(self.state.params).values())]
    self.assertTrue(all(moved))

  def test_nan_loss_is_skipped(self):
    # A non-finite loss (here through its balance weight) and so non-finite gradients, at finite weights.
    new, metrics = self.step(self.state, self.tokens, hyper(alpha=np.nan))
    self.assertFalse(bool(metrics['ok']))
    chex.assert_trees_all_equal(flat(new.params), flat(self.state.params))
    chex.assert_trees_all_equal(flat(new.bias), flat(self.state.bias))
    chex.assert_trees_all_equal(new.opt_state, self.state.opt_state)
    self.assertEqual((int(new.skipped), int(new.streak)), (1, 1))
    after, metrics = self.step(new, self.tokens, hyper())  # a finite step trains again and ends the streak
    self.assertTrue(bool(metrics['ok']))
    self.assertEqual((int(after.skipped), int(after.streak)), (1, 0))

  @parameterized.parameters(1e30, np.inf)
  def test_diverging_update_is_skipped(self, lr):
    # The loss and gradient at the current weights are finite; the update is not usable: at 1e30 the new
    # weights would be finite but ~1e30 (every later step NaN); an lr of 1e39 is inf in float32.
    new, metrics = self.step(self.state, self.tokens, hyper(lr=lr))
    self.assertTrue(np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm']))
    self.assertFalse(bool(metrics['ok']))
    chex.assert_trees_all_equal(flat(new.params), flat(self.state.params))
    chex.assert_trees_all_equal(new.opt_state, self.state.opt_state)
    self.assertEqual((int(new.skipped), int(new.streak)), (1, 1))

  def test_update_ratio_is_the_applied_step_over_the_weights(self):
    new, metrics = self.step(self.state, self.tokens, hyper(lr=3e-3))
    self.assertTrue(bool(metrics['ok']))
    old_p, new_p = flat(self.state.params), flat(new.params)
    norm = lambda tree: np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in tree.values()))
    want = norm({k: new_p[k] - old_p[k] for k in old_p}) / norm(old_p)
    np.testing.assert_allclose(metrics['update_ratio'], want, rtol=1e-4)
    self.assertLess(want, 1.0)  # a normal step: far below the default max_update_ratio
    # A limit below the step's own ratio skips it; 0 disables the limit.
    strict = jax.jit(functools.partial(train_step, self.graphdef, self.tx, max_update_ratio=want / 2))
    self.assertFalse(bool(strict(self.state, self.tokens, hyper(lr=3e-3))[1]['ok']))

  def test_microbatches_equal_one_batch(self):
    # Plain gradient steps (identity transformation): new params = params - lr * averaged gradient. (An Adam
    # first step is sign(g), which turns rounding-level gradient differences into 2 * lr.)
    sgd = optax.identity()
    graphdef, state = init_train_state(self.model, sgd)
    step = jax.jit(functools.partial(train_step, graphdef, sgd))
    whole, m1 = step(state, self.tokens, hyper(lr=1.0))
    split, m2 = step(state, self.tokens.reshape(2, 2, 17), hyper(lr=1.0))
    for key in ('loss', 'ce', 'mtp', 'balance', 'grad_norm'):
      np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, err_msg=key)
    chex.assert_trees_all_equal(m1['load_max_over_mean'], m2['load_max_over_mean'])
    delta = lambda s: jax.tree.map(lambda new, old: new - old, flat(s.params), flat(state.params))
    chex.assert_trees_all_close(delta(whole), delta(split), rtol=1e-4, atol=1e-6)  # params ~1: ulps ~1e-7
    chex.assert_trees_all_equal(flat(whole.bias), flat(split.bias))

  def test_loss_decreases(self):
    state, losses = self.state, []
    for _ in range(25):
      state, metrics = self.step(state, self.tokens, hyper(lr=3e-3))
      losses.append(float(metrics['ce']))
    self.assertLess(losses[-1], 0.5 * losses[0])


class NonFiniteStreakTest(absltest.TestCase):
  """The trainer stops, with a message, after max_nonfinite_streak consecutive skipped steps."""

  def test_streak_stops_the_run(self):
    from deepseek_jax import trainer
    config = ml_collections.ConfigDict(dict(max_nonfinite_streak=3, max_update_ratio=1.0, log_every=100, steps=100))
    writer = mock.Mock()
    clock = trainer._Clock(0, 100)
    loads = {'moe_layers/ffn': np.ones(2, np.float32), 'mtp/0/block/ffn': np.float32(1.5)}
    bad = {'loss': np.float32(np.nan), 'grad_norm': np.float32(np.nan), 'update_ratio': np.float32(np.nan),
           'ok': np.bool_(False), 'ce': 0.0, 'mtp': 0.0, 'balance': 0.0, 'load_max_over_mean': loads}
    good = {**bad, 'loss': np.float32(1.0), 'grad_norm': np.float32(1.0), 'ok': np.bool_(True)}
    # The streak is the train state's (train_step counts it on device, a checkpoint keeps it): a good step
    # resets it.
    for step, (values, streak) in enumerate([(bad, 1), (bad, 2), (good, 0), (bad, 1), (bad, 2)], start=1):
      trainer._record(writer, clock, config, TINY, step, {**values, 'streak': np.int32(streak)}, 1e-3, 10, None)
    with self.assertRaisesRegex(FloatingPointError, '3 consecutive steps skipped .*every saved checkpoint holds a '
                                'state that trained normally'):
      trainer._record(writer, clock, config, TINY, 6, {**bad, 'streak': np.int32(3)}, 1e-3, 10, None)
    self.assertEqual(writer.write.call_count, 5)
    # MoE layers are named by their layer ids: layers 1-2 of TINY, and the MTP depth as layer n_layers.
    self.assertEqual({k for k in writer.write.call_args[0][1] if k.startswith('load')},
                     {'load_max_over_mean/layer1', 'load_max_over_mean/layer2', 'load_max_over_mean/layer3'})
