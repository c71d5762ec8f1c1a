"""Batched matmul against packed 4-bit expert weights, dequantized in the kernel's operand fetch (decoding).

out[c] = x[c] @ dequantize(codes[expert[c]], scales[expert[c]]) for every block c of rows: the candidates of
grouped_matmul's 'dense' layout (every token of the step per candidate expert) or the copies of 'gather'
(one row per copy). The weights stay in HBM as their packed codes (two per byte, deepseek_jax/quant4.py) and
group scales; the TPU kernel scalar-prefetches expert[c] so each block's index map fetches that expert's codes
straight from the stack (no gathered copy of the weights is written), and unpacks and scales a tile in VMEM
just before the MXU consumes it. A decode step so reads each candidate's 0.5 + (scale) bytes per weight once.

Packing interleaves rows (byte p holds rows 2p and 2p + 1), so the kernel contracts the even rows with the low
nibbles and the odd rows with the high ones: x @ W = x[:, 0::2] @ W_low + x[:, 1::2] @ W_high, with the
activations split once outside (they are a few rows at decode). Group g's scale covers packed rows
[g * group / 2, (g + 1) * group / 2) of both halves. MXFP4's float8_e8m0fnu scales enter as their exponent bits
(uint8) and become 2^(bits - 127) by placing them in a float32's exponent field; bits 0 (2^-127, a subnormal)
becomes 0, which quant4.quantize produces only for groups with absmax < 2^-125.

The XLA path (CPU; GPU, where Triton has no scalar prefetch) dequantizes the read experts and runs one
batched einsum (quant4.dequantize), and is the reference the kernel is tested against.

Letters (this package's): C blocks of rows, X rows of one block, A input features (the contraction), P packed
rows A / 2, G scale groups along A, O output features, E experts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common

F32 = jnp.float32
_TILE_VALUES = 512 * 1024  # packed weight values unpacked per grid step (2 MB of each fp32 temporary)


def xla(x_CXA, codes_EPO, scales_EGO, experts_C, fmt: str):
  """The reference: the chosen experts dequantized (quant4.dequantize), one batched einsum, fp32 out."""
  from deepseek_jax import quant4
  w_CAO = quant4.dequantize(quant4.Packed(codes_EPO[experts_C], scales_EGO[experts_C]), fmt, x_CXA.dtype)
  return jnp.einsum('cxa,cao->cxo', x_CXA, w_CAO, preferred_element_type=F32)


def _values(nibbles, fmt: str):
  """4-bit codes (int32 0..15) as float32: int4 two's complement, or float4_e2m1fn's bit pattern (sign,
  two exponent bits, one mantissa bit) in arithmetic (no table lookups in a TPU kernel)."""
  if fmt == 'int4':
    return ((nibbles ^ 8) - 8).astype(F32)
  exponent, mantissa = (nibbles >> 1) & 3, (nibbles & 1).astype(F32)
  power = jnp.where(exponent == 3, 4.0, jnp.where(exponent == 2, 2.0, 1.0))
  magnitude = jnp.where(exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * power)
  return jnp.where((nibbles & 8) != 0, -magnitude, magnitude)


def _scales(scales_GN, fmt: str):
  if fmt == 'int4':
    return scales_GN.astype(F32)
  return jax.lax.bitcast_convert_type(scales_GN.astype(jnp.int32) << 23, F32)  # 2^(bits - 127)


def _kernel(experts_ref, even_ref, odd_ref, codes_ref, scales_ref, o_ref, acc_ref, *, fmt: str, half: int):
  del experts_ref  # consumed by the index maps
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  codes_PN = codes_ref[...].astype(jnp.int32)
  p, n = codes_PN.shape
  scale_GN = _scales(scales_ref[...], fmt)
  scale_PN = jnp.broadcast_to(scale_GN[:, None, :], (p // half, half, n)).reshape(p, n)
  dtype = even_ref.dtype
  for x_ref, nibbles in ((even_ref, codes_PN & 0xF), (odd_ref, codes_PN >> 4)):
    w_PN = (_values(nibbles, fmt) * scale_PN).astype(dtype)
    acc_ref[...] += jnp.dot(x_ref[...], w_PN, preferred_element_type=F32)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...]


def _packed_block(p: int, half: int, scale_itemsize: int, preferred: int) -> int:
  """Packed rows per block: whole groups, and both the codes' (uint8: 32 rows) and the scales' sublane
  tiles (8 rows of 32 bits, 16 of bf16, 32 of 8 bits) whole; the full contraction when nothing smaller fits."""
  groups_quantum = 8 * 4 // scale_itemsize
  quantum = math.lcm(32, half * groups_quantum)
  try:
    return common.pick_block(p, preferred, quantum=quantum)
  except ValueError:
    return p


def pallas(x_CXA, codes_EPO, scales_EGO, experts_C, fmt: str, *, interpret: bool = False, block_n: int = 512,
           block_p: int = 1024):
  """The TPU kernel: grid (blocks of rows, output tiles, contraction tiles), fp32 out [C, X, O]."""
  from jax.experimental.pallas import tpu as pltpu
  c, x, a = x_CXA.shape
  _, p, o = codes_EPO.shape
  half = p // scales_EGO.shape[1]
  if fmt == 'mxfp4':
    scales_EGO = jax.lax.bitcast_convert_type(scales_EGO, jnp.uint8)
  bp = _packed_block(p, half, scales_EGO.dtype.itemsize, block_p)
  # The unpacked tile's fp32 temporaries (codes, scales, values) stay a few MB of VMEM however large bp is.
  bn = common.pick_block(o, max(128, min(block_n, _TILE_VALUES // bp)))
  even_CXP, odd_CXP = x_CXA[..., 0::2], x_CXA[..., 1::2]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(c, o // bn, p // bp),
      in_specs=[pl.BlockSpec((None, x, bp), lambda i, j, kk, ex: (i, 0, kk)),
                pl.BlockSpec((None, x, bp), lambda i, j, kk, ex: (i, 0, kk)),
                pl.BlockSpec((None, bp, bn), lambda i, j, kk, ex: (ex[i], kk, j)),
                pl.BlockSpec((None, bp // half, bn), lambda i, j, kk, ex: (ex[i], kk, j))],
      out_specs=pl.BlockSpec((None, x, bn), lambda i, j, kk, ex: (i, 0, j)),
      scratch_shapes=[pltpu.VMEM((x, bn), F32)])
  return pl.pallas_call(
      functools.partial(_kernel, fmt=fmt, half=half), grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((c, x, o), F32),
      compiler_params=common.compiler_params(False, parallel=2, arbitrary=1), interpret=interpret,
      name=f'{fmt}_expert_gemm',
  )(experts_C.astype(jnp.int32), even_CXP, odd_CXP, codes_EPO, scales_EGO)


def gemm(x_CXA, codes_EPO, scales_EGO, experts_C, fmt: str, impl: str = 'xla'):
  """x [C, X, A] against expert experts_C[c]'s packed weight (codes [E, A / 2, O], scales [E, G, O]), fp32
  [C, X, O]. impl: 'pallas' / 'interpret' run the TPU kernel (on GPU, 'pallas' runs the XLA path)."""
  if impl == 'xla' or (impl == 'pallas' and jax.default_backend() == 'gpu'):
    return xla(x_CXA, codes_EPO, scales_EGO, experts_C, fmt)
  return pallas(x_CXA, codes_EPO, scales_EGO, experts_C, fmt, interpret=common.is_interpret(impl))
