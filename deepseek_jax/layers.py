"""Basic layers: RMSNorm, embedding, bias-free Linear and the SwiGLU MLP (spec §3.1).

Every parameter carries `logical_axes` metadata (one name per dimension); `sharding.py` maps those names
onto mesh axes through a single rules table. Kernels are stored [in, out] (the transpose of the
checkpoint's [out, in]) so that matmuls read `x_BTD @ w_DF`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import ModelConfig


def normal_param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig) -> nnx.Param:
  """A weight drawn from N(0, init_std^2) (paper §4.2) in the parameter dtype."""
  value = cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(cfg.jnp_param_dtype), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  """RMSNorm computed in fp32 whatever the activation dtype (spec §10.13)."""

  def __init__(self, dim: int, cfg: ModelConfig, axis_name: str = 'norm'):
    self.eps = cfg.norm_eps
    self.scale = nnx.Param(jnp.ones((dim,), cfg.jnp_param_dtype), logical_axes=(axis_name,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding table [vocab, dim]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = cfg.jnp_dtype
    self.embedding = normal_param(rngs, (cfg.vocab_size, cfg.dim), ('vocab', 'embed'), cfg)

  def __call__(self, tokens_BT):
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)


class Linear(nnx.Module):
  """Bias-free projection y = x @ W with W stored [in, out]."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = cfg.jnp_dtype
    self.kernel = normal_param(rngs, (d_in, d_out), axes, cfg)

  def __call__(self, x):
    return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


def swiglu(x, w1, w2, w3):
  """w2(silu(w1 x) * w3 x): the FFN of every dense layer and expert (official `MLP`)."""
  return w2(jax.nn.silu(w1(x)) * w3(x))


class MLP(nnx.Module):
  """Dense SwiGLU FFN; also the shared experts of an MoE layer (width n_shared_experts * moe_inter_dim)."""

  def __init__(self, dim: int, inter_dim: int, cfg: ModelConfig, rngs: nnx.Rngs, hidden_axis: str = 'mlp'):
    self.w1 = Linear(dim, inter_dim, ('embed', hidden_axis), cfg, rngs)
    self.w2 = Linear(inter_dim, dim, (hidden_axis, 'embed'), cfg, rngs)
    self.w3 = Linear(dim, inter_dim, ('embed', hidden_axis), cfg, rngs)

  def __call__(self, x_BTD):
    return swiglu(x_BTD, self.w1, self.w2, self.w3)
