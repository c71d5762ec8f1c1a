"""4-bit weight formats for decoding, packed two values per byte: int4 with per-group scales, and MXFP4.

A weight w [..., A, O] ([in, out], as our kernels and expert stacks [E, A, O] are laid out) is quantized in
groups of `group` consecutive input rows per output column (the contraction dimension, so a matmul can
dequantize a group with one scale):
  'int4'   symmetric int4: codes round(w / s) clipped to [-8, 7] with s = absmax(group) / 7, one scale per
           group of 32, 64 or 128 in bfloat16 or float32.
  'mxfp4'  MXFP4 of the OCP Microscaling (MX) formats: float4_e2m1fn elements (±{0, 0.5, 1, 1.5, 2, 3,
           4, 6}) sharing one float8_e8m0fnu power-of-two scale per group of 32, 2^(floor(log2 absmax) - 2)
           (2 = e2m1's largest exponent); element conversion rounds to nearest even and saturates at ±6.
Codes are packed along A: byte [a // 2] holds row a in its low nibble when a is even, the high nibble when odd
(int4 as two's complement nibbles, e2m1 as its bit pattern), so `codes` is uint8 [..., A / 2, O] on the host
and on every device, and `scales` is [..., A / group, O]. Bytes per parameter: int4 with bf16 scales 0.5 + 2 /
group (0.516 at 128), MXFP4 0.5 + 1 / 32 = 0.531.

Letters beyond model.py's key: A / O the input / output features of a weight, G its groups along A, Z the
rows of one group, P the packed rows (A / 2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ('int4', 'mxfp4')
INT4_GROUPS = (32, 64, 128)
MX_GROUP = 32  # the OCP MX block size
_E2M1_MAX_EXPONENT = 2  # 6.0 = 1.5 * 2^2
# The 16 float4_e2m1fn values by bit pattern (sign, two exponent bits, one mantissa bit).
_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


class Packed(NamedTuple):
  codes: jax.Array  # uint8 [..., A / 2, O]: two 4-bit codes per byte along A
  scales: jax.Array  # [..., A / group, O]: bfloat16 / float32 (int4), float8_e8m0fnu (mxfp4)


def check(fmt: str, group: int, a: int, name: str = 'weight') -> None:
  """Raises ValueError naming what a weight of `a` input rows cannot be quantized with."""
  if fmt not in FORMATS:
    raise ValueError(f'{name}: 4-bit format must be one of {FORMATS}, got {fmt!r}')
  allowed = INT4_GROUPS if fmt == 'int4' else (MX_GROUP,)
  if group not in allowed:
    raise ValueError(f'{name}: {fmt} groups must be one of {allowed} input rows, got {group}')
  if a % group:
    raise ValueError(f'{name}: its {a} input rows do not divide into {fmt} groups of {group}')


def quantize(w_AO, fmt: str, group: int | None = None, scale_dtype=jnp.bfloat16) -> Packed:
  """w [..., A, O] (any float dtype) as packed 4-bit codes and their group scales. group: default 128 (int4),
  32 (mxfp4); scale_dtype: int4 only (mxfp4's scales are float8_e8m0fnu)."""
  *lead, a, o = w_AO.shape
  group = group or (MX_GROUP if fmt == 'mxfp4' else 128)
  check(fmt, group, a)
  w_GZO = w_AO.astype(jnp.float32).reshape(*lead, a // group, group, o)  # Z: the rows of one group
  absmax_G1O = jnp.max(jnp.abs(w_GZO), axis=-2, keepdims=True)
  if fmt == 'int4':
    scale_G1O = jnp.where(absmax_G1O > 0, absmax_G1O / 7, 1.0).astype(scale_dtype)
    # Divide by the scale as stored, so dequantization (codes x stored scale) inverts exactly this.
    codes_GZO = jnp.clip(jnp.round(w_GZO / scale_G1O.astype(jnp.float32)), -8, 7).astype(jnp.int8)
    nibbles_GZO = (codes_GZO & 0xF).astype(jnp.uint8)  # two's complement in 4 bits
  else:
    # floor(log2 absmax) exactly: frexp gives absmax = mantissa x 2^exponent, mantissa in [0.5, 1).
    exponent_G1O = jnp.frexp(jnp.where(absmax_G1O > 0, absmax_G1O, 1.0))[1] - 1 - _E2M1_MAX_EXPONENT
    scale_G1O = jnp.exp2(jnp.clip(exponent_G1O, -127, 127).astype(jnp.float32)).astype(jnp.float8_e8m0fnu)
    nibbles_GZO = _e2m1_bits(w_GZO / scale_G1O.astype(jnp.float32))
  nibbles_AO = nibbles_GZO.reshape(*lead, a, o)
  return Packed(nibbles_AO[..., 0::2, :] | (nibbles_AO[..., 1::2, :] << 4), scale_G1O[..., 0, :])


def _e2m1_bits(x):
  """The float4_e2m1fn bit pattern (uint8, 0..15) of x rounded to nearest even, saturating at +-6. In
  arithmetic, not by dtype conversion: XLA:CPU's classic emitters lower the 4-bit conversions wrongly."""
  m = jnp.abs(x)
  step = jnp.where(m >= 4, 2.0, jnp.where(m >= 2, 1.0, 0.5))  # e2m1's spacing at each magnitude
  q = jnp.minimum(jnp.round(m / step) * step, 6.0)  # jnp.round: half to even (the even mantissa bit)
  index = jnp.where(q < 2, q * 2, jnp.where(q < 4, q + 2, q / 2 + 4))  # the magnitude's place in _E2M1
  return (index.astype(jnp.uint8) | jnp.where(x < 0, 8, 0).astype(jnp.uint8)).astype(jnp.uint8)


def dequantize(packed: Packed, fmt: str, dtype=jnp.float32):
  """The weight [..., A, O] in `dtype`: each code times its group's scale."""
  codes_PO, scales_GO = packed
  *lead, p, o = codes_PO.shape
  a, groups = 2 * p, scales_GO.shape[-2]
  nibbles_PO2 = jnp.stack([codes_PO & 0xF, codes_PO >> 4], axis=-1)  # low nibble: the even row
  nibbles_AO = jnp.swapaxes(nibbles_PO2, -1, -2).reshape(*lead, a, o)
  if fmt == 'int4':
    values_AO = nibbles_AO.astype(jnp.int8)
    values_AO = jnp.where(values_AO > 7, values_AO - 16, values_AO).astype(jnp.float32)
  else:
    values_AO = jnp.asarray(_E2M1)[nibbles_AO]
  values_GZO = values_AO.reshape(*lead, groups, a // groups, o)
  return (values_GZO * scales_GO.astype(jnp.float32)[..., None, :]).reshape(*lead, a, o).astype(dtype)


def bytes_per_parameter(packed: Packed) -> float:
  """Stored bytes (codes and scales) per weight value."""
  stored = packed.codes.size * packed.codes.dtype.itemsize + packed.scales.size * packed.scales.dtype.itemsize
  return stored / (packed.codes.size * 2)
