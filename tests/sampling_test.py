"""The reference greedy rollout equals argmax decoding by growing full forwards; the decoders' argmax is
numpy's."""

import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from deepseek_jax.config import PRESETS
from deepseek_jax.sampling import argmax, greedy_rollout
from tests.helpers import forward, random_model


class ArgmaxTest(absltest.TestCase):

  def test_first_of_ties_infinities_and_nans_as_numpy(self):
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, (64, 300)).astype(np.float32)  # many ties for the largest value
    logits[1] = -np.inf
    logits[2, [5, 9]] = np.inf
    logits[3, [7, 40]] = np.nan  # numpy (like jnp.argmax) takes the first NaN
    logits[4] = np.nan
    logits[5, 299] = 10.0
    for dtype in (jnp.float32, jnp.bfloat16):
      got = np.asarray(argmax(jnp.asarray(logits, dtype)))
      np.testing.assert_array_equal(got, np.argmax(np.asarray(jnp.asarray(logits, dtype), np.float32), axis=-1))
      self.assertEqual(got.dtype, np.int32)


class GreedyRolloutTest(absltest.TestCase):

  @pytest.mark.slow  # the reference of the references: generate_test checks generate() against it by default
  def test_matches_growing_forwards(self):
    cfg = PRESETS['tiny']
    model = random_model(cfg, seed=7)
    prompt = jnp.array([[3, 17, 250], [9, 9, 1]], jnp.int32)
    got = np.asarray(greedy_rollout(model, prompt, 6))
    seq = np.asarray(prompt)
    for _ in range(6):  # no padding, no buffer: the sequence grows one token at a time
      logits = np.asarray(forward(model, jnp.asarray(seq)).logits_BTW)
      seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(got, seq)

  def test_too_long(self):
    cfg = PRESETS['tiny']
    with self.assertRaisesRegex(ValueError, 'max_seq_len'):
      greedy_rollout(random_model(cfg), jnp.zeros((1, 100), jnp.int32), cfg.max_seq_len)
