"""The token-based schedules of the V3 recipe (paper §4.2) and the configs that carry them."""

import math

from absl.testing import parameterized

from configs import demo, tiny, v2_lite_16b, v3_671b
from deepseek_jax import schedules
from deepseek_jax.config import PRESETS

V3 = v3_671b.get_config()


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
    self.assertEqual(V3.balance_alpha, 1e-4)

  def test_v3_config_totals(self):
    self.assertEqual((V3.optimizer['b1'], V3.optimizer['b2'], V3.optimizer['weight_decay'],
                      V3.optimizer['clip_norm']), (0.9, 0.95, 0.1, 1.0))
    self.assertEqual(PRESETS[V3.model].init_std, 0.006)
    # Step count: ~469B tokens of ramp plus the rest at 15360 x 4096 tokens reach 14.8T.
    ramp_tokens = 469e9
    tail_steps = V3.steps - int(ramp_tokens / ((3072 + 15360) / 2 * 4096))
    self.assertAlmostEqual((ramp_tokens + tail_steps * 15360 * 4096) / 14.8e12, 1.0, places=3)

  def test_v2_lite_step_decay(self):
    c = v2_lite_16b.get_config()
    total = 5.7e12
    lr = lambda frac: schedules.learning_rate(frac * total, c.lr)
    self.assertAlmostEqual(lr(0.5), 4.2e-4)
    self.assertAlmostEqual(lr(0.85), 4.2e-4 * 0.316)
    self.assertAlmostEqual(lr(0.95), 4.2e-4 * 0.316**2)
    self.assertEqual(c.balance_alpha, 1e-3)

  @parameterized.parameters(demo, tiny)
  def test_small_configs_follow_the_paper_shape(self, module):
    c = module.get_config()
    total = c.steps * c.batch_size * c.seq_len
    lr = lambda frac: schedules.learning_rate(frac * total, c.lr)
    self.assertAlmostEqual(lr(0.5), c.lr['peak'])
    self.assertLess(lr(0.96), c.lr['peak'] / 2)  # cosine decay late in the run
    self.assertAlmostEqual(lr(1.0), c.lr['peak'] * 7.3e-6 / 2.2e-4)
    self.assertTrue(math.isclose(schedules.piecewise(0.5 * total, c.mtp_lambda), 0.3))
    self.assertTrue(math.isclose(schedules.piecewise(0.9 * total, c.mtp_lambda), 0.1))
