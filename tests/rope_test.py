"""RoPE + YaRN against the official complex-number formulation (official inference/model.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from deepseek_jax.config import PRESETS
from deepseek_jax.rope import apply_rope, inv_freq

V3 = PRESETS['v3-671b']


def official_freqs(dim, base, factor, orig, beta_fast, beta_slow, yarn):
  """Transcription of precompute_freqs_cis (DeepSeek-V3 inference/model.py) in float64."""
  freqs = 1.0 / (base ** (np.arange(0, dim, 2) / dim))
  if yarn:
    def find(r):
      return dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(find(beta_fast)), 0), min(math.ceil(find(beta_slow)), dim - 1)
    smooth = 1 - np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    freqs = freqs / factor * (1 - smooth) + freqs * smooth
  return freqs


class RopeTest(parameterized.TestCase):

  def test_v3_yarn_bands(self):
    # The official correction dims for V3 (factor 40, beta 32 / 1, 4096 original): low = 10, high = 23: dims j <= 10 keep their frequency, j >= 23 are divided by 40.
    plain = inv_freq(V3.replace(max_seq_len=4096))
    yarn = inv_freq(V3)
    np.testing.assert_array_equal(yarn[:11], plain[:11])
    np.testing.assert_allclose(yarn[23:], plain[23:] / 40, rtol=1e-6)
    self.assertTrue(np.all((yarn[11:23] < plain[11:23]) & (yarn[11:23] > plain[11:23] / 40)))

  @parameterized.parameters(True, False)
  def test_freqs_match_official(self, yarn):
    cfg = V3 if yarn else V3.replace(max_seq_len=4096)
    want = official_freqs(64, 10000.0, 40, 4096, 32, 1, yarn)
    np.testing.assert_allclose(inv_freq(cfg), want, rtol=2e-6)

  @parameterized.parameters(True, False)
  def test_matches_complex_rotation(self, yarn):
    cfg = V3 if yarn else V3.replace(max_seq_len=4096)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 64)).astype(np.float32)
    x[0, 1, 2, :4] *= 100  # outliers
    positions = np.array([[0, 1, 2, 3, 4], [7, 100, 4095, 9000, 163000]], np.int32)
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), cfg))
    xc = x.astype(np.float64).reshape(2, 5, 3, 32, 2)
    xc = xc[..., 0] + 1j * xc[..., 1]  # interleaved pairs as complex numbers
    # Both references round the angle position * freq to float32 before cos/sin; so do we.
    angles = (positions[..., None].astype(np.float32) * inv_freq(cfg)).astype(np.float64)
    rot = xc * np.exp(1j * angles)[:, :, None, :]
    want = np.stack([rot.real, rot.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

  def test_scores_depend_on_relative_position(self):
    cfg = PRESETS['tiny']
    q, k = jax.random.normal(jax.random.key(0), (2, 8))

    def score(pq, pk):
      rq = apply_rope(q[None, None], jnp.array([[pq]]), cfg)
      rk = apply_rope(k[None, None], jnp.array([[pk]]), cfg)
      return float(jnp.sum(rq * rk))

    self.assertAlmostEqual(score(5, 2), score(105, 102), places=4)
    self.assertNotAlmostEqual(score(5, 2), score(5, 3), places=2)

  def test_attention_factor_scales(self):
    cfg = V3.replace(rope_attention_factor=1.5)
    x = jax.random.normal(jax.random.key(1), (1, 3, 64))
    pos = jnp.array([[0, 1, 2]])
    np.testing.assert_allclose(apply_rope(x, pos, cfg), 1.5 * apply_rope(x, pos, V3), rtol=1e-6, atol=1e-6)
