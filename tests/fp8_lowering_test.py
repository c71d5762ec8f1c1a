"""Every FP8 kernel lowers for TPU (Mosaic) and, where it has a Triton body, for CUDA, at DeepSeek-V3's shapes; so
do the 4-bit expert GEMM and MLA's splash attention, forward and backward (TPU).

Lowering runs the Pallas -> Mosaic / Triton lowering on CPU from shapes alone: block-shape rule violations
(TPU (8, 128) tiles, Triton powers of two) surface here rather than on a user's accelerator. It does not
run libtpu's or ptxas's own compilation (that needs the device's toolchain).
"""

import jax
import jax.numpy as jnp
from absl.testing import parameterized

from deepseek_jax import attention
from pallas_kernels import act_quant, block_gemm, grouped_gemm, quant4_gemm, transpose_quant, weight_quant

F8, F32 = jnp.float8_e4m3fn, jnp.float32
TOKENS = 4096
# (K, N) of V3's projections, [in, out]: q_a+kv_a fused, q_b, kv_b, o, dense up / down, expert up / down,
# the head-sized 16384 x 7168 wo, and kv_a_proj_with_mqa's 576 outputs padded to 640.
WEIGHTS = [(7168, 2112 + 64), (1536, 24576), (512, 32768), (16384, 7168), (7168, 18432), (18432, 7168),
           (7168, 2048), (2048, 7168), (7168, 640)]
PLATFORMS = [('tpu', 'tpu'), ('cuda', 'gpu')]


def spec(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def lower(fn, platform, *specs):
  return jax.jit(fn).trace(*specs).lower(lowering_platforms=(platform,))


class LoweringTest(parameterized.TestCase):

  @parameterized.product(k=[7168, 18432, 2048, 1536, 512, 16384], platform=PLATFORMS)
  def test_act_quant(self, k, platform):
    lower(lambda x: act_quant.pallas(x, target=platform[1]), platform[0], spec((TOKENS, k), jnp.bfloat16))

  @parameterized.product(kn=WEIGHTS, platform=PLATFORMS)
  def test_weight_quant(self, kn, platform):
    lower(lambda w: weight_quant.pallas(w, target=platform[1]), platform[0], spec(kn, F32))

  @parameterized.product(k=[7168, 2048, 1536, 512], platform=PLATFORMS)
  def test_transpose_quant(self, k, platform):
    lower(lambda q, s: transpose_quant.pallas(q, s, target=platform[1]), platform[0], spec((TOKENS, k), F8),
          spec((k // 128, TOKENS, 1), F32))

  @parameterized.product(kn=WEIGHTS, platform=PLATFORMS)
  def test_block_gemm(self, kn, platform):
    k, n = kn
    lower(lambda a, sa, b, sb: block_gemm.pallas(a, sa, b, sb, jnp.bfloat16, target=platform[1]), platform[0],
          spec((TOKENS, k), F8), spec((k // 128, TOKENS, 1), F32), spec((k, n), F8), spec((k // 128, 1, n), F32))

  @parameterized.parameters((8192, 7168, 2048, 8), (8192, 2048, 7168, 8), (4096, 7168, 2048, 256))
  def test_grouped_gemm_and_wgrad_tpu(self, u, k, n, e):
    tiles = spec((u // 128,), jnp.int32)
    lower(lambda a, sa, w, sw, te: grouped_gemm.gemm_pallas(a, sa, w, sw, te, jnp.bfloat16), 'tpu',
          spec((u, k), F8), spec((k // 128, u, 1), F32), spec((e, k, n), F8), spec((e, k // 128, 1, n), F32), tiles)
    lower(lambda at, sat, b, sb, te: grouped_gemm.wgrad_pallas(at, sat, b, sb, te, e), 'tpu',
          spec((k, u), F8), spec((u // 128, k, 1), F32), spec((u, n), F8), spec((u // 128, 1, n), F32), tiles)

  @parameterized.product(fmt=[('int4', 128, jnp.bfloat16), ('int4', 32, F32), ('mxfp4', 32, jnp.float8_e8m0fnu)],
                         ao=[(7168, 2048), (2048, 7168)], cx=[(8, 1), (64, 8), (256, 32)])
  def test_quant4_expert_gemm_tpu(self, fmt, ao, cx):
    # V3's expert up / down projections; rows: one copy each (gather), batch 8 and 32 x top-8 (dense).
    (fmt, group, scale_dtype), (a, o), (c, x) = fmt, ao, cx
    lower(lambda xs, codes, scales, ex: quant4_gemm.pallas(xs, codes, scales, ex, fmt), 'tpu',
          spec((c, x, a), jnp.bfloat16), spec((256, a // 2, o), jnp.uint8), spec((256, a // group, o), scale_dtype),
          spec((c,), jnp.int32))

  @parameterized.parameters(4096, 32768)
  def test_splash_attention_tpu(self, t):
    # V3's 128 heads, q/k width 128 + 64, values 128: the training step's attention and its gradients.
    b, h = 1, 128
    specs = [spec(s, jnp.bfloat16) for s in ((b, t, h, 128), (b, t, h, 64), (b, t, h, 128), (b, t, 64), (b, t, h, 128))]
    grad = jax.grad(lambda *a: jnp.sum(attention.splash(*a, 192 ** -0.5).astype(F32)), argnums=tuple(range(5)))
    lower(grad, 'tpu', *specs)

  def test_tpu7x_native_fp8_lowers(self):
    # On TPU7x the MXU takes e4m3 directly (no bf16 upcast in VMEM).
    lower(lambda a, sa, b, sb: block_gemm.pallas(a, sa, b, sb, target='tpu', upcast=None), 'tpu',
          spec((TOKENS, 7168), F8), spec((56, TOKENS, 1), F32), spec((7168, 2048), F8), spec((56, 1, 2048), F32))
