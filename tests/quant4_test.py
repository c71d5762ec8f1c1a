"""4-bit weight formats: the packing layout, int4's rounding bound, MXFP4 against an independent reference of
the OCP MX rules, the stored bytes, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from deepseek_jax import quant4


def weights(shape=(3, 256, 40), seed=0):
  w = jax.random.normal(jax.random.key(seed), shape)
  return w.at[1, 70, 5].set(60.0).at[2, 3, 0].set(-45.0)  # outliers


def reference_mxfp4(w_AO):
  """OCP MX v1.0 by brute force in numpy: per 32 input rows, X = 2^(floor(log2 absmax) - 2); each element the
  nearest of e2m1's magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} to |v| / X (ties to the even mantissa bit, beyond 6
  saturating), with v's sign."""
  grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
  w = np.asarray(w_AO, np.float64)
  out = np.zeros_like(w)
  for start in range(0, w.shape[-2], 32):
    block = w[..., start:start + 32, :]
    absmax = np.abs(block).max(axis=-2, keepdims=True)
    scale = 2.0 ** (np.floor(np.log2(np.where(absmax > 0, absmax, 1))) - 2)
    x = np.abs(block) / scale
    distance = np.abs(x[..., None] - grid)
    best = distance.min(-1, keepdims=True)
    ties = np.isclose(distance, best, rtol=0, atol=1e-12)
    # Among equally near values take the one with an even mantissa bit (indices 0, 2, 4, 6 of the grid).
    choice = np.where(ties.sum(-1) > 1, np.argmax(ties & (np.arange(8) % 2 == 0), -1), np.argmin(distance, -1))
    out[..., start:start + 32, :] = np.sign(block) * grid[choice] * scale
  return out


class Quant4Test(parameterized.TestCase):

  def test_packing_layout(self):
    # One group of 32 rows, one column: codes -8 .. 7 twice, exactly representable with scale 0.5 (absmax 3.5
    # from code 7; -8 x 0.5 = -4 would raise the absmax, so the column is built from codes -7 .. 7).
    codes = np.array(list(range(-7, 8)) + list(range(-7, 8)) + [0, 7], np.int64)
    w = jnp.asarray(codes[:, None] * 0.5, jnp.float32)
    packed = quant4.quantize(w, 'int4', 32, jnp.float32)
    self.assertEqual((packed.codes.dtype, packed.codes.shape), (jnp.uint8, (16, 1)))  # two codes per byte
    nibbles = codes & 0xF
    np.testing.assert_array_equal(np.asarray(packed.codes[:, 0]), nibbles[0::2] | (nibbles[1::2] << 4))
    np.testing.assert_array_equal(np.asarray(packed.scales), [[0.5]])
    np.testing.assert_array_equal(np.asarray(quant4.dequantize(packed, 'int4')), np.asarray(w))

  @parameterized.product(group=quant4.INT4_GROUPS, scale_dtype=(jnp.bfloat16, jnp.float32))
  def test_int4_error_is_half_a_step(self, group, scale_dtype):
    w = weights()
    packed = quant4.quantize(w, 'int4', group, scale_dtype)
    self.assertEqual(packed.scales.shape, (3, 256 // group, 40))
    step = np.repeat(np.asarray(packed.scales, np.float32), group, axis=-2)
    error = np.abs(np.asarray(quant4.dequantize(packed, 'int4')) - np.asarray(w))
    # Rounding to the nearest code: half a step; a bf16 scale may round below absmax / 7, clipping the group's
    # largest element by at most its own rounding (2^-8 relative).
    self.assertLessEqual(float((error / step).max()), 0.5 + 7 * 2**-8)
    absmax = np.abs(np.asarray(w)).reshape(3, 256 // group, group, 40).max(-2)
    np.testing.assert_allclose(np.asarray(packed.scales, np.float32), absmax / 7, rtol=2**-8)

  def test_an_outlier_changes_only_its_own_group(self):
    w = weights()
    quiet = w.at[1, 70, 5].set(0.1)
    loud, calm = quant4.quantize(w, 'int4', 32), quant4.quantize(quiet, 'int4', 32)
    differs = np.asarray(loud.scales != calm.scales)
    self.assertEqual(list(zip(*np.nonzero(differs))), [(1, 70 // 32, 5)])

  def test_mxfp4_matches_the_ocp_rules(self):
    w = weights()
    packed = quant4.quantize(w, 'mxfp4', 32)
    self.assertEqual(packed.scales.dtype, jnp.float8_e8m0fnu)  # powers of two by construction
    np.testing.assert_array_equal(np.asarray(quant4.dequantize(packed, 'mxfp4')), reference_mxfp4(w))

  def test_bytes_per_parameter(self):
    w = weights((2, 512, 64))
    self.assertEqual(quant4.bytes_per_parameter(quant4.quantize(w, 'int4', 128)), 0.5 + 2 / 128)
    self.assertEqual(quant4.bytes_per_parameter(quant4.quantize(w, 'int4', 32, jnp.float32)), 0.5 + 4 / 32)
    self.assertEqual(quant4.bytes_per_parameter(quant4.quantize(w, 'mxfp4')), 0.5 + 1 / 32)

  def test_jit_and_dtype(self):
    w = weights()
    packed = jax.jit(lambda w: quant4.quantize(w, 'mxfp4', 32))(w.astype(jnp.bfloat16))
    out = jax.jit(lambda p: quant4.dequantize(p, 'mxfp4', jnp.bfloat16))(packed)
    self.assertEqual((out.dtype, out.shape), (jnp.bfloat16, w.shape))

  def test_errors(self):
    w = weights((4, 96, 8))
    with self.assertRaisesRegex(ValueError, 'its 96 input rows do not divide into int4 groups of 64'):
      quant4.quantize(w, 'int4', 64)
    with self.assertRaisesRegex(ValueError, 'int4 groups must be one of \\(32, 64, 128\\) input rows, got 16'):
      quant4.quantize(w, 'int4', 16)
    with self.assertRaisesRegex(ValueError, 'mxfp4 groups must be one of \\(32,\\)'):
      quant4.quantize(w, 'mxfp4', 128)
    with self.assertRaisesRegex(ValueError, "must be one of \\('int4', 'mxfp4'\\), got 'nf4'"):
      quant4.quantize(w, 'nf4', 32)


if __name__ == '__main__':
  absltest.main()
