"""FP8 kernels against their pure-jnp references (interpret mode on CPU) and the unquantized products.

The JAX pattern: `Fp8KernelTest` runs the compiled kernels (IMPL = 'pallas') and skips off TPU/GPU;
`Fp8KernelInterpretTest` runs the same tests in interpret mode on CPU. Inputs carry outlier rows (log-normal
row scales) so per-tile scales matter. Quantizers must match bit for bit (FP8 codes compared as uint8).
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from pallas_kernels import act_quant, block_gemm, common, grouped_gemm, transpose_quant, weight_quant
from pallas_kernels.fp8_linear import Recipe, fp8_grouped_linear, fp8_linear, fp8_linear_frozen


def outlier_rows(key, shape, spread=2.0):
  k1, k2 = jax.random.split(key)
  return jax.random.normal(k1, shape) * jnp.exp(spread * jax.random.normal(k2, shape[:-1] + (1,)))


def codes(q):
  return np.asarray(q).view(np.uint8)


def rel_fro(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def calc_diff(a, b):
  """DeepGEMM's metric: 1 - 2<a, b> / (|a|^2 + |b|^2)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return 1 - 2 * np.sum(a * b) / (np.sum(a * a) + np.sum(b * b))


def cosine(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


class Fp8KernelTest(parameterized.TestCase):
  IMPL = 'pallas'

  def setUp(self):
    super().setUp()
    if self.IMPL == 'pallas' and jax.default_backend() not in ('tpu', 'gpu'):
      self.skipTest('compiled Pallas kernels need a TPU or GPU; Fp8KernelInterpretTest covers CPU')

  @parameterized.product(shape=[(100, 300), (256, 512), (8, 128)], scale_fmt=['f32', 'ue8m0'])
  def test_act_quant_bit_exact(self, shape, scale_fmt):
    x = outlier_rows(jax.random.key(0), shape).astype(jnp.bfloat16)
    x = x.at[0].set(0.0)  # an all-zero tile takes the floor scale and zero codes
    q, s = act_quant.act_quant(x, scale_fmt, self.IMPL)
    q_ref, s_ref = act_quant.act_quant(x, scale_fmt, 'xla')
    np.testing.assert_array_equal(codes(q), codes(q_ref))
    np.testing.assert_array_equal(s, s_ref)
    self.assertEqual(s.shape, (shape[0], common.round_up(shape[1]) // 128))
    np.testing.assert_array_equal(s[0], common.scale_from_amax(jnp.zeros(()), scale_fmt))  # the floor
    if scale_fmt == 'ue8m0':
      np.testing.assert_array_equal(np.log2(np.asarray(s)) % 1, 0)  # powers of two
    xf = np.asarray(common.pad_axis(x.astype(jnp.float32), 1))
    self.assertLess(rel_fro(act_quant.dequantize(q, s), xf), 0.04)  # e4m3: ~2.6% on Gaussian tiles

  @parameterized.product(shape=[(300, 200), (512, 384), (128, 640)], scale_fmt=['f32', 'ue8m0'])
  def test_weight_quant_bit_exact(self, shape, scale_fmt):
    w = outlier_rows(jax.random.key(1), shape, spread=1.0)
    q, s = weight_quant.weight_quant(w, scale_fmt, self.IMPL)
    q_ref, s_ref = weight_quant.weight_quant(w, scale_fmt, 'xla')
    np.testing.assert_array_equal(codes(q), codes(q_ref))
    np.testing.assert_array_equal(s, s_ref)
    self.assertEqual(s.shape, tuple(common.round_up(d) // 128 for d in shape))

  @parameterized.parameters((256, 384), (384, 128))
  def test_transpose_quant_bit_exact(self, m, k):
    q, s = act_quant.act_quant(outlier_rows(jax.random.key(2), (m, k)))
    qt, st = transpose_quant.transpose_quant(q, s, 'f32', self.IMPL)
    qt_ref, st_ref = transpose_quant.transpose_quant(q, s, 'f32', 'xla')
    np.testing.assert_array_equal(codes(qt), codes(qt_ref))
    np.testing.assert_array_equal(st, st_ref)
    self.assertEqual((qt.shape, st.shape), ((k, m), (k, m // 128)))

  @parameterized.product(target=['tpu', 'gpu'], out_dtype=[jnp.float32, jnp.bfloat16])
  def test_block_gemm_matches_reference(self, target, out_dtype):
    if self.IMPL == 'pallas' and target != common.kernel_target(None):
      self.skipTest(f'the {target} kernel body runs on a {target} only')
    xq, xs = act_quant.act_quant(outlier_rows(jax.random.key(3), (256, 512)))
    wq, ws = weight_quant.weight_quant(0.05 * jax.random.normal(jax.random.key(4), (512, 384)))
    ws_cols = common.expand_block_scales(ws, 384)
    got = block_gemm.pallas(xq, xs.T[..., None], wq, ws_cols[:, None, :], out_dtype,
                            interpret=self.IMPL == 'interpret', target=target)
    want = block_gemm.reference(xq, xs, wq, ws_cols)
    self.assertEqual(got.dtype, out_dtype)
    self.assertLessEqual(rel_fro(got, want), 1e-5 if out_dtype == jnp.float32 else 4e-3)
    self.assertLessEqual(rel_fro(block_gemm.xla(xq, xs, wq, ws_cols), want), 1e-5)  # the XLA path too

  def test_grouped_gemm_and_wgrad_match_reference(self):
    tile_expert = jnp.array([0, 0, 2, 3, 3, 3], jnp.int32)  # expert 1 gets no tile
    u, k, n, e = 6 * 128, 256, 384, 4
    rows = outlier_rows(jax.random.key(5), (u, k)).at[200:256].set(0.0)  # padding rows
    rq, rs = act_quant.act_quant(rows)
    w = 0.05 * jax.random.normal(jax.random.key(6), (e, k, n))
    quantized = [weight_quant.weight_quant(w[i]) for i in range(e)]
    wq = jnp.stack([q for q, _ in quantized])
    ws = jnp.stack([common.expand_block_scales(s, n) for _, s in quantized])
    want = grouped_gemm.gemm_reference(rq, rs, wq, ws, tile_expert)
    got = grouped_gemm.grouped_gemm(rq, rs, wq, ws, tile_expert, jnp.float32, self.IMPL)
    self.assertLessEqual(rel_fro(got, want), 1e-5)
    np.testing.assert_array_equal(got[200:256], 0.0)
    rtq, rts = transpose_quant.transpose_quant(rq, rs)
    dyq, dys = act_quant.act_quant(jax.random.normal(jax.random.key(7), (u, n)).T)
    want_w = grouped_gemm.wgrad_reference(rtq, rts, dyq.T, dys.T, tile_expert, e)
    got_w = grouped_gemm.grouped_wgrad(rtq, rts, dyq.T, dys.T, tile_expert, e, self.IMPL)
    self.assertLessEqual(rel_fro(got_w, want_w), 1e-5)
    np.testing.assert_array_equal(got_w[1], 0.0)

  def test_linear_against_unquantized_product(self):
    x = outlier_rows(jax.random.key(8), (4, 64, 320))
    w = 0.05 * jax.random.normal(jax.random.key(9), (320, 384))
    recipe = Recipe('f32', self.IMPL)
    self.assertLess(calc_diff(fp8_linear(x, w, recipe), x @ w), 1e-3)
    self.assertLess(calc_diff(fp8_linear(x, w, Recipe('ue8m0', self.IMPL)), x @ w), 1e-3)

  @parameterized.parameters('dense', 'grouped', 'frozen')
  def test_gradients_through_custom_vjp(self, kind):
    recipe = Recipe('f32', self.IMPL)
    if kind == 'grouped':
      tile_expert = jnp.array([0, 2, 2, 3], jnp.int32)
      x = outlier_rows(jax.random.key(10), (4 * 128, 200))
      w = 0.05 * jax.random.normal(jax.random.key(11), (4, 200, 300))
      ours = lambda x, w: fp8_grouped_linear(x, w, tile_expert, recipe)
      exact = lambda x, w: jnp.einsum('tbk,tkn->tbn', x.reshape(4, 128, -1), w[tile_expert]).reshape(512, -1)
    else:
      x = outlier_rows(jax.random.key(10), (3, 70, 200))
      w = 0.05 * jax.random.normal(jax.random.key(11), (200, 300))
      ours, exact = (lambda x, w: fp8_linear(x, w, recipe)), (lambda x, w: x @ w)
      if kind == 'frozen':
        wq, ws = weight_quant.weight_quant(w)
        ours = lambda x, w: fp8_linear_frozen(x, wq, ws, 300, recipe) + 0.0 * jnp.sum(w)
    cot = jax.random.normal(jax.random.key(12), exact(x, w).shape)
    got = jax.vjp(ours, x, w)[1](cot)
    want = jax.vjp(exact, x, w)[1](cot)
    self.assertGreater(cosine(got[0], want[0]), 0.995)
    self.assertLess(rel_fro(got[0], want[0]), 0.08)
    if kind != 'frozen':
      self.assertGreater(cosine(got[1], want[1]), 0.995)
      self.assertLess(rel_fro(got[1], want[1]), 0.08)

  def test_saturation_not_nan(self):
    # Plain casts turn |x| >= 464 into NaN; to_fp8 clips to the e4m3 range first.
    q = common.to_fp8(jnp.array([500.0, -1e6, 447.0]), jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), [448.0, -448.0, 448.0])


class Fp8KernelInterpretTest(Fp8KernelTest):
  IMPL = 'interpret'


class Fp8XlaPathTest(parameterized.TestCase):
  """The CPU training path: the XLA implementations agree with the kernels' references."""

  def test_xla_linear_matches_interpret(self):
    x = outlier_rows(jax.random.key(13), (2, 64, 256))
    w = 0.05 * jax.random.normal(jax.random.key(14), (256, 128))
    cot = jax.random.normal(jax.random.key(15), (2, 64, 128))
    a = jax.vjp(lambda x, w: fp8_linear(x, w, Recipe('f32', 'xla')), x, w)
    b = jax.vjp(lambda x, w: fp8_linear(x, w, Recipe('f32', 'interpret')), x, w)
    self.assertLess(rel_fro(a[0], b[0]), 1e-5)
    for ga, gb in zip(a[1](cot), b[1](cot)):
      self.assertLess(rel_fro(ga, gb), 1e-5)

  def test_auto_impl(self):
    # The documented choice: Pallas on TPU; XLA on CPU and on GPU (where the Triton kernels are opt-in).
    for backend, want in (('tpu', 'pallas'), ('gpu', 'xla'), ('cpu', 'xla')):
      with mock.patch.object(jax, 'default_backend', return_value=backend):
        self.assertEqual(common.resolve_impl('auto'), want, backend)
        self.assertEqual(common.resolve_impl('interpret'), 'interpret', backend)  # explicit choices stand
    with self.assertRaisesRegex(ValueError, 'fp8 kernel impl'):
      common.resolve_impl('cuda')
