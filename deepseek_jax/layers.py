"""Basic layers: RMSNorm, embedding, bias-free Linear and the SwiGLU MLP (official `RMSNorm`, `Linear`, `MLP`).

Every parameter carries `logical_axes` metadata (one name per dimension); `sharding.py` maps those names
onto mesh axes through a single rules table. Kernels are stored [in, out] (the transpose of the
checkpoint's [out, in]) so that matmuls read `x_BTD @ w_DF`. Shapes come from the ModelConfig, dtypes and
kernels from the Runtime. With rt.fp8_weights a projection holds its weight as FP8 codes [in', out'] (padded
to multiples of 128) plus one fp32 scale per 128x128 block, the form of the official checkpoints, and
dequantizes it on use (the official default `gemm_impl="bf16"`) or, under rt.quant == 'fp8', multiplies it in
FP8 directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import cpu_kernels, quant4
from deepseek_jax.config import ModelConfig, Runtime
from pallas_kernels.fp8_linear import Recipe, fp8_linear, fp8_linear_frozen
from pallas_kernels.weight_quant import dequantize, weight_quant


class HeldWeight(nnx.Variable):
  """Inference storage of a quantized weight, not a Param: FP8 codes or the fp32 scales of their 128x128
  blocks; packed 4-bit codes or their group scales (quant4.py)."""


def normal_param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, rt: Runtime) -> nnx.Param:
  """A weight drawn from N(0, init_std^2) (paper §4.2) in the parameter dtype."""
  value = cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(rt.jnp_param_dtype), logical_axes=tuple(axes))


def fp8_weight(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, rt: Runtime) -> tuple[HeldWeight, HeldWeight]:
  """(codes [..., in', out'], scales [..., in'/128, out'/128]) of a normal_param draw, quantized per block."""
  value = cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
  quantize = lambda w: weight_quant(w, rt.fp8_scale_fmt)
  for _ in shape[:-2]:
    quantize = jax.vmap(quantize)
  codes, scales = quantize(value)
  return HeldWeight(codes, logical_axes=tuple(axes)), HeldWeight(scales, logical_axes=tuple(axes))


def quant4_weight(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, rt: Runtime) -> tuple[HeldWeight, HeldWeight]:
  """(packed codes [..., in / 2, out], group scales [..., in / group, out]) of a normal_param draw in
  rt.weights4's format (quant4.quantize)."""
  value = cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
  packed = quant4.quantize(value, rt.weights4, rt.weights4_group or None)
  return HeldWeight(packed.codes, logical_axes=tuple(axes)), HeldWeight(packed.scales, logical_axes=tuple(axes))


def dequantize_weight(codes, scales, shape, dtype):
  """The [..., in, out] weight of FP8 codes and block scales, cropped to `shape` (the official
  weight_dequant)."""
  deq = dequantize
  for _ in codes.shape[:-2]:
    deq = jax.vmap(deq)
  return deq(codes, scales)[..., :shape[-2], :shape[-1]].astype(dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in fp32 whatever the activation dtype (official `RMSNorm`: rms_norm of x.float())."""

  def __init__(self, dim: int, cfg: ModelConfig, rt: Runtime, axis_name: str = 'norm'):
    self.eps = cfg.norm_eps
    self.scale = nnx.Param(jnp.ones((dim,), rt.jnp_param_dtype), logical_axes=(axis_name,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding table [vocab, dim]."""

  def __init__(self, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs):
    self.dtype = rt.jnp_dtype
    self.embedding = normal_param(rngs, (cfg.vocab_size, cfg.dim), ('vocab', 'embed'), cfg, rt)

  def __call__(self, tokens_BT):
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)


def fp8_recipe(rt: Runtime) -> Recipe | None:
  return Recipe(rt.fp8_scale_fmt, rt.fp8_impl) if rt.quant == 'fp8' else None


class Linear(nnx.Module):
  """Bias-free projection y = x @ W with W stored [in, out]; FP8 GEMMs under rt.quant == 'fp8' unless
  `quantize` is False (the output head stays in high precision, paper §3.3.1)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], cfg: ModelConfig, rt: Runtime,
               rngs: nnx.Rngs, quantize: bool = True):
    self.dtype = rt.jnp_dtype
    self.shape = (d_in, d_out)
    self.recipe = fp8_recipe(rt) if quantize else None
    self.impl = rt.linear_impl
    if rt.fp8_weights and quantize:
      self.kernel, self.kernel_scale = fp8_weight(rngs, (d_in, d_out), axes, cfg, rt)
    else:
      self.kernel, self.kernel_scale = normal_param(rngs, (d_in, d_out), axes, cfg, rt), None

  def dense_weight(self):
    """The [in, out] weight in the compute dtype (FP8-held weights dequantized)."""
    if self.kernel_scale is not None:
      return dequantize_weight(self.kernel[...], self.kernel_scale[...], self.shape, self.dtype)
    return self.kernel[...].astype(self.dtype)

  def __call__(self, x):
    x = x.astype(self.dtype)
    if self.kernel_scale is not None:
      if self.recipe is not None:
        return fp8_linear_frozen(x, self.kernel[...], self.kernel_scale[...], self.shape[1], self.recipe)
      return jnp.dot(x, self.dense_weight())
    if self.recipe is not None:
      return fp8_linear(x, self.kernel[...], self.recipe)
    w = self.kernel[...]
    xla = lambda x, w: jnp.dot(x, w.astype(self.dtype))
    if cpu_kernels.native_linear(self.impl, math.prod(x.shape[:-1]), w):  # decoding on CPU
      return cpu_kernels.matmul(x, w, xla).astype(self.dtype)
    return xla(x, w)


def swiglu(x, w1, w2, w3):
  """w2(silu(w1 x) * w3 x): the FFN of every dense layer and expert (official `MLP`)."""
  return w2(jax.nn.silu(w1(x)) * w3(x))


class MLP(nnx.Module):
  """Dense SwiGLU FFN; also the shared experts of an MoE layer (width n_shared_experts * moe_inter_dim)."""

  def __init__(self, dim: int, inter_dim: int, cfg: ModelConfig, rt: Runtime, rngs: nnx.Rngs,
               hidden_axis: str = 'mlp'):
    self.w1 = Linear(dim, inter_dim, ('embed', hidden_axis), cfg, rt, rngs)
    self.w2 = Linear(inter_dim, dim, (hidden_axis, 'embed'), cfg, rt, rngs)
    self.w3 = Linear(dim, inter_dim, ('embed', hidden_axis), cfg, rt, rngs)

  def __call__(self, x_BTD):
    return swiglu(x_BTD, self.w1, self.w2, self.w3)
