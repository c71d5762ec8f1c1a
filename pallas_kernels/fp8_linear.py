"""Differentiable FP8 linear layers: all three GEMMs of a Linear in FP8 (DeepSeek-V3 §3.3, Figure 6).

Forward   y  = Q(x; 1x128) @ Q(W; 128x128)            inputs cached as FP8 for the backward pass
Dgrad     dx = Q(dy; 1x128) @ Q(W; 128x128)^T         block scales are transpose-invariant: no requantization
Wgrad     dW = Q(x^T; 1x128 along tokens) @ Q(dy; 128x1 along tokens)
                                                      x^T re-tiled from the cached FP8 x (transpose_quant)
Every product accumulates in fp32 with promotion per 128-element K block; dW comes out fp32 for the fp32
master weights. `fp8_linear` is for [K, N] weights, `fp8_grouped_linear` for MoE experts [E, K, N] on rows
laid out by expert in tiles of a multiple of 128 (grouped_gemm). `fp8_linear_frozen` takes weights already
held in FP8 (an official checkpoint) and has no weight gradient. Reverse-mode autodiff does not go through
a pallas_call, hence the custom VJPs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.act_quant import act_quant
from pallas_kernels.block_gemm import gemm
from pallas_kernels.grouped_gemm import grouped_gemm, grouped_wgrad
from pallas_kernels.transpose_quant import transpose_quant
from pallas_kernels.weight_quant import weight_quant


class Recipe(NamedTuple):
  """Static FP8 settings: scale format ('f32' or 'ue8m0') and kernel implementation (see common.IMPLS)."""
  scale_fmt: str = 'f32'
  impl: str = 'auto'

  def kernels(self) -> str:
    return common.resolve_impl(self.impl)


def _rows(x, multiple=common.BLOCK):
  """x [..., K] -> [M', K] with M' a multiple of 128 (the weight gradient quantizes 128 tokens at a time)."""
  return common.pad_axis(x.reshape(-1, x.shape[-1]), 0, multiple)


def _wgrad(xq, xs, dy_MN, recipe, impl):
  """x^T @ dy with both operands tiled 1x128 along the tokens."""
  xtq, xts = transpose_quant(xq, xs, recipe.scale_fmt, impl)
  dytq, dyts = act_quant(dy_MN.T, recipe.scale_fmt, impl)
  return gemm(xtq, xts, dytq.T, dyts.T, jnp.float32, impl)


# Dense ----------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_linear(x, w_KN, recipe: Recipe = Recipe()):
  """x [..., K] @ w [K, N] with the FP8 recipe; output in x's dtype."""
  return _linear_fwd(x, w_KN, recipe)[0]


def _linear_fwd(x, w_KN, recipe):
  impl = recipe.kernels()
  k, n = w_KN.shape
  xq, xs = act_quant(_rows(x), recipe.scale_fmt, impl)
  wq, ws = weight_quant(w_KN, recipe.scale_fmt, impl)
  y = gemm(xq, xs, wq, common.expand_block_scales(ws, wq.shape[1]), x.dtype, impl)
  rows = x.size // k
  # w itself rides along only for its shape and dtype: it is the live master weight, not a copy.
  return y[:rows, :n].reshape(*x.shape[:-1], n), (xq, xs, wq, ws, w_KN)


def _linear_bwd(recipe, residuals, dy):
  xq, xs, wq, ws, w_KN = residuals
  impl = recipe.kernels()
  k, n = w_KN.shape
  dy_MN = common.pad_axis(_rows(dy), 1)
  dyq, dys = act_quant(dy_MN, recipe.scale_fmt, impl)
  dx = gemm(dyq, dys, wq.T, common.expand_block_scales(ws.T, wq.shape[0]), dy.dtype, impl)
  dw = _wgrad(xq, xs, dy_MN, recipe, impl)
  rows = dy.size // n
  return dx[:rows, :k].reshape(*dy.shape[:-1], k), dw[:k, :n].astype(w_KN.dtype)


fp8_linear.defvjp(_linear_fwd, _linear_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fp8_linear_frozen(x, wq_KN, ws_YZ, n_out: int, recipe: Recipe = Recipe()):
  """x @ W for W held in FP8 (q [K', N'] padded to 128 multiples, scales [K'/128, N'/128]); no dW."""
  impl = recipe.kernels()
  xq, xs = act_quant(_rows(x, 8), recipe.scale_fmt, impl)
  y = gemm(xq, xs, wq_KN, common.expand_block_scales(ws_YZ, wq_KN.shape[1]), x.dtype, impl)
  return y[:x.size // x.shape[-1], :n_out].reshape(*x.shape[:-1], n_out)


def _frozen_fwd(x, wq_KN, ws_YZ, n_out, recipe):
  # A zero-size array carries x's feature count (a static int) through the residuals.
  return fp8_linear_frozen(x, wq_KN, ws_YZ, n_out, recipe), (wq_KN, ws_YZ, jnp.zeros((0, x.shape[-1])))


def _frozen_bwd(n_out, recipe, residuals, dy):
  wq, ws, k_marker = residuals
  impl = recipe.kernels()
  dyq, dys = act_quant(common.pad_axis(_rows(dy, 8), 1), recipe.scale_fmt, impl)
  dx = gemm(dyq, dys, wq.T, common.expand_block_scales(ws.T, wq.shape[0]), dy.dtype, impl)
  k = k_marker.shape[1]
  return dx[:dy.size // n_out, :k].reshape(*dy.shape[:-1], k), None, None


fp8_linear_frozen.defvjp(_frozen_fwd, _frozen_bwd)


# Grouped (MoE experts) --------------------------------------------------------------------------------------


def quantize_experts(w_EKN, recipe: Recipe, impl: str):
  """Per-expert 128x128 quantization: (q [E, K', N'], per-column scales [E, K'/128, N'])."""
  wq, ws = jax.vmap(lambda w: weight_quant(w, recipe.scale_fmt, impl))(w_EKN)
  return wq, jax.vmap(common.expand_block_scales, in_axes=(0, None))(ws, wq.shape[2]), ws


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped_linear(rows_UK, w_EKN, tile_expert, recipe: Recipe = Recipe()):
  """rows of tile t (U = tiles * tile, tile a multiple of 128) @ w[tile_expert[t]] with the FP8 recipe."""
  return _grouped_fwd(rows_UK, w_EKN, tile_expert, recipe)[0]


def _grouped_fwd(rows_UK, w_EKN, tile_expert, recipe):
  impl = recipe.kernels()
  n = w_EKN.shape[2]
  rq, rs = act_quant(rows_UK, recipe.scale_fmt, impl)
  wq, ws_cols, ws = quantize_experts(w_EKN, recipe, impl)
  y = grouped_gemm(rq, rs, wq, ws_cols, tile_expert, rows_UK.dtype, impl)
  return y[:, :n], (rq, rs, wq, ws, tile_expert, w_EKN)


def _grouped_bwd(recipe, residuals, dy_UN):
  rq, rs, wq, ws, tile_expert, w_EKN = residuals
  impl = recipe.kernels()
  e, k, n = w_EKN.shape
  dy_UN = common.pad_axis(dy_UN, 1)
  dyq, dys = act_quant(dy_UN, recipe.scale_fmt, impl)
  wq_t = jnp.swapaxes(wq, 1, 2)
  ws_t_cols = jax.vmap(common.expand_block_scales, in_axes=(0, None))(jnp.swapaxes(ws, 1, 2), wq.shape[1])
  dx = grouped_gemm(dyq, dys, wq_t, ws_t_cols, tile_expert, dy_UN.dtype, impl)
  rtq, rts = transpose_quant(rq, rs, recipe.scale_fmt, impl)
  dytq, dyts = act_quant(dy_UN.T, recipe.scale_fmt, impl)
  dw = grouped_wgrad(rtq, rts, dytq.T, dyts.T, tile_expert, e, impl)
  return dx[:, :k], dw[:, :k, :n].astype(w_EKN.dtype), None


fp8_grouped_linear.defvjp(_grouped_fwd, _grouped_bwd)
