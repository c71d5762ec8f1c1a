"""The 4-bit expert GEMM kernel (interpret mode on CPU) against the product with the dequantized weights in
float64, for every format, group and scale dtype, fp32 and bf16 activations, with outlier weights; the
compiled kernel where a TPU is present."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from deepseek_jax import quant4
from pallas_kernels import quant4_gemm

FORMATS = [('int4', 32, jnp.float32), ('int4', 64, jnp.bfloat16), ('int4', 128, jnp.bfloat16),
           ('int4', 128, jnp.float32), ('mxfp4', 32, None)]


def packed_stack(fmt, group, scale_dtype, shape=(5, 256, 384), seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(k1, shape) * jnp.where(jax.random.uniform(k2, shape) > 0.995, 30.0, 1.0)  # outliers
  return quant4.quantize(w, fmt, group, **({'scale_dtype': scale_dtype} if scale_dtype else {}))


def expected(x_CXA, packed, experts_C, fmt, dtype):
  """float64 product with the dequantized weights, rounded to the activations' dtype as the kernel does."""
  w_EAO = np.asarray(quant4.dequantize(packed, fmt, dtype).astype(jnp.float32), np.float64)
  return np.einsum('cxa,cao->cxo', np.asarray(x_CXA.astype(jnp.float32), np.float64), w_EAO[np.asarray(experts_C)])


class Quant4GemmTest(parameterized.TestCase):
  IMPL = 'interpret'

  def setUp(self):
    super().setUp()
    if self.IMPL == 'pallas' and jax.default_backend() != 'tpu':
      self.skipTest('the compiled 4-bit kernel is a TPU kernel; Quant4GemmTest runs it in interpret mode')

  @parameterized.product(fmt=FORMATS, dtype=[jnp.float32, jnp.bfloat16])
  def test_matches_the_dequantized_product(self, fmt, dtype):
    fmt, group, scale_dtype = fmt
    packed = packed_stack(fmt, group, scale_dtype)
    x_CXA = jax.random.normal(jax.random.key(1), (4, 3, 256)).astype(dtype)
    experts_C = jnp.array([4, 0, 4, 2])  # repeats and the last expert
    out = quant4_gemm.gemm(x_CXA, packed.codes, packed.scales, experts_C, fmt, self.IMPL)
    want = expected(x_CXA, packed, experts_C, fmt, dtype)
    self.assertEqual(out.dtype, jnp.float32)
    # fp32 accumulation of 256 products: a few ulps of the largest output
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())

  def test_contraction_in_several_blocks(self):
    # 2048 input rows (packed 1024) with blocks of 512 packed rows: the accumulator carries across blocks.
    packed = packed_stack('int4', 128, jnp.float32, shape=(3, 2048, 256))
    x_CXA = jax.random.normal(jax.random.key(2), (2, 1, 2048))
    experts_C = jnp.array([2, 1])
    out = quant4_gemm.pallas(x_CXA, packed.codes, packed.scales, experts_C, 'int4', interpret=True, block_p=512)
    want = expected(x_CXA, packed, experts_C, 'int4', jnp.float32)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())

  def test_xla_path_is_the_same_product(self):
    packed = packed_stack('mxfp4', 32, None)
    x_CXA = jax.random.normal(jax.random.key(3), (2, 4, 256))
    experts_C = jnp.array([3, 1])
    out = quant4_gemm.gemm(x_CXA, packed.codes, packed.scales, experts_C, 'mxfp4', 'xla')
    want = expected(x_CXA, packed, experts_C, 'mxfp4', jnp.float32)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())


class Quant4GemmCompiledTest(Quant4GemmTest):
  IMPL = 'pallas'


if __name__ == '__main__':
  absltest.main()
