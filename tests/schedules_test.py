"""The token-based schedules of the V3 recipe (paper §4.2) and the configs that carry them."""

import math

from absl.testing import parameterized

from configs import demo, tiny, v2_lite_16b, v3_671b
from deepseek_jax import run_config, schedules
from deepseek_jax.config import PRESETS

V3 = run_config.schedule(v3_671b.get_config())  # in tokens of the config's own run


class ScheduleTest(parameterized.TestCase):

  def test_v3_learning_rate(self):
    lr = lambda tokens: schedules.learning_rate(tokens, V3.lr)
    warmup = 2000 * 3072 * 4096  # the first 2K steps run at the ramp's first batch size
    self.assertEqual(lr(0), 0.0)
    self.assertAlmostEqual(lr(warmup / 2), 1.1e-4)
    self.assertAlmostEqual(lr(warmup), 2.2e-4)
    self.assertAlmostEqual(lr(5e12), 2.2e-4)
    self.assertAlmostEqual(lr(10e12 - 1), 2.2e-4)
    self.assertAlmostEqual(lr(10e12 + 4.3e12 / 2), (2.2e-4 + 2.2e-5) / 2)  # cosine midpoint
    self.assertAlmostEqual(lr(14.3e12 - 1), 2.2e-5, places=12)
    self.assertAlmostEqual(lr(14.3e12 + 100e9), 2.2e-5)
    self.assertAlmostEqual(lr(14.3e12 + 400e9), 7.3e-6)
    self.assertAlmostEqual(lr(14.8e12 + 1e12), 7.3e-6)  # past the end: the last stage holds

  def test_v3_batch_ramp(self):
    ramp = dict(start=3072, end=15360, ramp_tokens=469e9, multiple=1536)
    self.assertEqual(schedules.batch_size(0, ramp), 3072)
    self.assertEqual(schedules.batch_size(469e9 / 2, ramp), 9216)  # halfway, on the 1536 grid
    self.assertEqual(schedules.batch_size(469e9, ramp), 15360)
    sizes = {schedules.batch_size(t * 1e9, ramp) for t in range(0, 470)}
    self.assertTrue(all(s % 1536 == 0 and 3072 <= s <= 15360 for s in sizes))
    self.assertLessEqual(len(sizes), 9)  # one compilation per distinct size

  def test_v3_gamma_and_lambda(self):
    gamma = lambda t: schedules.piecewise(t, V3.gamma)
    lam = lambda t: schedules.piecewise(t, V3.mtp_lambda)
    self.assertEqual((gamma(0), gamma(14.29e12), gamma(14.31e12)), (0.001, 0.001, 0.0))
    self.assertEqual((lam(0), lam(9.99e12), lam(10.01e12)), (0.3, 0.3, 0.1))

  def test_v3_config_totals(self):
    c = v3_671b.get_config()
    self.assertEqual((c.optimizer['b1'], c.optimizer['b2'], c.optimizer['weight_decay'],
                      c.optimizer['clip_norm']), (0.9, 0.95, 0.1, 1.0))
    self.assertEqual(PRESETS[c.model].init_std, 0.006)
    self.assertEqual(c.balance_alpha, 1e-4)
    # Stepping through the ramp's batch sizes by hand: the config's steps train 14.8T tokens (within a step).
    tokens, sizes = 0, []
    for _ in range(c.steps):
      size = 15360 if tokens >= 469e9 else max(3072, int(3072 + (15360 - 3072) * tokens / 469e9) // 1536 * 1536)
      sizes.append(size)
      tokens += size * 4096
    self.assertGreaterEqual(tokens, 14.8e12)
    self.assertLess(tokens - sizes[-1] * 4096, 14.8e12)
    self.assertEqual(V3.total_tokens, tokens)

  def test_v2_lite_step_decay(self):
    c = v2_lite_16b.get_config()
    s = run_config.schedule(c)
    self.assertAlmostEqual(s.total_tokens / 5.7e12, 1.0, places=3)
    lr = lambda frac: schedules.learning_rate(frac * s.total_tokens, s.lr)
    self.assertAlmostEqual(lr(0.5), 4.2e-4)
    self.assertAlmostEqual(lr(0.85), 4.2e-4 * 0.316)
    self.assertAlmostEqual(lr(0.95), 4.2e-4 * 0.316**2)
    self.assertEqual(c.balance_alpha, 1e-3)

  @parameterized.product(module=(demo, tiny), overrides=({}, {'steps': 1000}, {'batch_size': 64, 'seq_len': 256}))
  def test_small_configs_follow_the_paper_shape(self, module, overrides):
    c = module.get_config()
    c.update(overrides)  # what --config.steps=1000 and friends do, after the file built the config
    s = run_config.schedule(c)
    total = c.steps * c.batch_size * c.seq_len
    self.assertEqual(s.total_tokens, total)
    lr = lambda frac: schedules.learning_rate(frac * total, s.lr)
    self.assertAlmostEqual(lr(0.5), c.lr['peak'])
    self.assertAlmostEqual(lr(0.67), c.lr['peak'])  # constant to 10 / 14.8 of the run
    self.assertLess(lr(0.96), c.lr['peak'] / 2)  # cosine decay late in the run
    self.assertAlmostEqual(lr(1.0), c.lr['peak'] * 7.3e-6 / 2.2e-4)
    self.assertTrue(math.isclose(schedules.piecewise(0.5 * total, s.mtp_lambda), 0.3))
    self.assertTrue(math.isclose(schedules.piecewise(0.9 * total, s.mtp_lambda), 0.1))
    gamma = schedules.piecewise(0.96 * total, s.gamma)
    self.assertGreater(gamma, 0)  # the bias keeps moving until 14.3 / 14.8 of the run
    self.assertEqual(schedules.piecewise(0.97 * total, s.gamma), 0.0)
    log = schedules.describe(s, c.batch_size * c.seq_len)
    self.assertIn(f'(step {c.steps:,})', log)
    self.assertIn(f'MTP lambda 0.3 to step {round(10 / 14.8 * c.steps):,}, then 0.1', log)

  def test_fractions_are_checked(self):
    c = tiny.get_config()
    c.lr.warmup = -1.0
    with self.assertRaisesRegex(ValueError, r'config\.lr\.warmup=-1'):
      run_config.schedule(c)
    c = tiny.get_config()
    c.gamma = [0.5]
    with self.assertRaisesRegex(ValueError, r'config\.gamma must be a list of'):
      run_config.schedule(c)
