"""FP8 conventions shared by every kernel: the DeepSeek-V3 recipe's formats (paper §3.3).

- float8_e4m3fn values, |x| <= 448. One fp32 scale per 1x128 tile of an activation row and per 128x128 block
  of a weight; scale = max(amax, 1e-4) / 448 (the floor of the official act_quant), optionally rounded up to
  a power of two ("ue8m0", DeepSeek-V3.1). q = clip(x / s, -448, 448): the cast alone does not saturate
  (|x| >= 464 becomes NaN), and x / s, not x * (1 / s), so kernels and references agree bit for bit.
- Kernel-side scale layouts put the 128-block index of the contraction dim first with a trailing singleton
  axis, [K/128, M, 1] for activations and [K/128, 1, N] for weights, which satisfies both the TPU (8, 128)
  block rule and Triton's power-of-two rule for block shapes. The public wrappers speak the canonical
  [M, K/128] and [K/128, N/128] layouts.

Letters in this package (its own, independent of the model's key): M rows of an activation, K the contraction
dimension, N output features, E experts, U rows laid out by expert; Y the 128-blocks of the contraction
dimension and Z those of N (scale arrays); in einsums O an offset inside a 128-block, J the row tiles of a
grouped GEMM and R the rows of one tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-4
SCALE_FORMATS = ('f32', 'ue8m0')


def scale_from_amax(amax, scale_fmt: str = 'f32'):
  """The dequantization scale of a tile whose largest magnitude is amax (float32)."""
  scale = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) / FP8_MAX
  if scale_fmt == 'ue8m0':
    scale = _round_up_to_power_of_two(scale)
  elif scale_fmt != 'f32':
    raise ValueError(f'scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}')
  return scale


def _round_up_to_power_of_two(x):
  """2^ceil(log2 x) for positive normal float32 x, exactly, with integer ops on the bits (exp2 and log2
  are approximations: exp2(-13.0) is not 2^-13 on every backend)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)
  return jax.lax.bitcast_convert_type(exponent << 23, jnp.float32)


def to_fp8(x, scale):
  """x / scale saturated to the e4m3 range (both float32, broadcast-compatible)."""
  return jnp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(FP8)


def round_up(n: int, multiple: int = BLOCK) -> int:
  return -(-n // multiple) * multiple


def pad_axis(x, axis: int, multiple: int = BLOCK):
  """Zero-pads one axis to a multiple (zero tiles quantize to zero codes with the floor scale)."""
  size = x.shape[axis]
  if size % multiple == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, round_up(size, multiple) - size)
  return jnp.pad(x, widths)


def pick_block(size: int, preferred: int, quantum: int = BLOCK, pow2: bool = False) -> int:
  """The largest block <= preferred that divides `size` and is a multiple of `quantum` (with pow2: quantum
  times a power of two, as Triton requires). `size` itself when it is small enough."""
  if size <= preferred and (not pow2 or (size // quantum) & (size // quantum - 1) == 0):
    return size
  candidates = [b for b in range(quantum, min(size, preferred) + 1, quantum)
                if size % b == 0 and (not pow2 or (b // quantum) & (b // quantum - 1) == 0)]
  if not candidates:
    raise ValueError(f'no block of {quantum}-multiples up to {preferred} divides {size}')
  return candidates[-1]


def expand_block_scales(scale_YZ, n: int):
  """128x128 block scales [K/128, N/128] -> per-column [K/128, N] (a weight block's scale for each column)."""
  return jnp.repeat(scale_YZ, BLOCK, axis=1)[:, :n]


IMPLS = ('auto', 'pallas', 'interpret', 'xla')


def resolve_impl(impl: str) -> str:
  """'auto': Pallas on TPU, XLA elsewhere (CPU; GPU, where the Triton kernels are an opt-in 'pallas')."""
  if impl not in IMPLS:
    raise ValueError(f'fp8 kernel impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'pallas' if jax.default_backend() == 'tpu' else 'xla'
  return impl


def is_interpret(impl: str) -> bool:
  return impl == 'interpret'


def kernel_target(target: str | None) -> str:
  """'gpu' (Pallas Triton) on a GPU backend, else 'tpu' (Mosaic; also what interpret mode emulates)."""
  if target is None:
    return 'gpu' if jax.default_backend() == 'gpu' else 'tpu'
  if target not in ('tpu', 'gpu'):
    raise ValueError(f"kernel target must be 'tpu' or 'gpu', got {target!r}")
  return target


def compiler_params(gpu: bool, parallel: int, arbitrary: int = 0):
  """Mosaic grid semantics (the K reduction axes last, 'arbitrary'), or Triton launch parameters."""
  if gpu:
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.CompilerParams(dimension_semantics=('parallel',) * parallel + ('arbitrary',) * arbitrary)


def tpu_generation() -> int:
  """The TPU chip generation (0 off TPU): v5e/v5p -> 5, v6e -> 6, TPU7x -> 7."""
  if jax.default_backend() != 'tpu':
    return 0
  from jax.experimental.pallas import tpu as pltpu
  return int(getattr(pltpu.get_tpu_info(), 'generation', 0) or 0)
