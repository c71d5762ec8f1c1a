"""One optimizer step: loss and gradients, AdamW, the aux-loss-free bias update, a non-finite guard.

train_step = nnx.split -> jax.value_and_grad over the Params -> AdamW update under plain jax.jit. After the
update, each MoE layer's RouterBias moves by the sign rule on the whole global batch's counts
(router.update_router_bias, paper §2.1.2), outside autodiff and the optimizer. A step whose loss, gradient
norm or update is not finite, or whose update is larger than `max_update_ratio` x the weights' norm (a
diverging step: at lr 1e30 the loss and gradient are still finite, the new weights are not usable), changes
nothing but two counters in the state (total skipped, current streak); the trainer stops when the streak
reaches its limit. So every state the trainer can save is one that trained normally.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_jax.loss import loss_fn
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.pipeline import pipeline_grads
from deepseek_jax.router import RouterBias, update_router_bias


class TrainState(NamedTuple):
  params: nnx.State  # nnx.Param values: fp32 master weights
  bias: nnx.State  # RouterBias values (empty for models without a correction bias)
  opt_state: optax.OptState
  skipped: jax.Array  # int32 steps skipped for a non-finite loss or gradient
  streak: jax.Array  # int32 consecutive skipped steps


class Hyper(NamedTuple):
  """Per-step values of the token-based schedules (traced scalars: no recompilation when they change)."""
  lr: jax.Array
  gamma: jax.Array
  mtp_lambda: jax.Array
  balance_alpha: jax.Array


def init_train_state(model: DeepSeekV3, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params, bias = nnx.split(model, nnx.Param, RouterBias)
  # Two distinct counters: a train step donates its state, and one buffer cannot be donated twice.
  return graphdef, TrainState(params, bias, tx.init(params), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))


def _grads_and_terms(graphdef, params, bias, tokens_BS, hyper: Hyper):
  def loss(p):
    terms = loss_fn(nnx.merge(graphdef, p, bias), tokens_BS, mtp_lambda=hyper.mtp_lambda,
                    balance_alpha=hyper.balance_alpha)
    return terms.total, terms

  (_, terms), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return grads, terms


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState, tokens_NBS,
               hyper: Hyper, pipeline: tuple | None = None, max_update_ratio: float = 1.0
               ) -> tuple[TrainState, dict]:
  """tokens_NBS: the global batch as N microbatches [N, B, S]; gradients and counts accumulate over them.
  pipeline: (mesh, schedule name) to pipeline the microbatches over the mesh's 'pipeline' axis.
  max_update_ratio: the largest ||new - old params|| / ||old params|| a kept step may have (0: no limit)."""
  n_micro = tokens_NBS.shape[0]
  grads_and_terms = lambda tokens_BS: _grads_and_terms(graphdef, state.params, state.bias, tokens_BS, hyper)
  if pipeline is not None:
    grads, terms = pipeline_grads(graphdef, state.params, state.bias, tokens_NBS, hyper, *pipeline)
  elif n_micro == 1:
    grads, terms = grads_and_terms(tokens_NBS[0])
  else:
    def accumulate(carry, tokens_BS):
      return jax.tree.map(jnp.add, carry, grads_and_terms(tokens_BS)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(grads_and_terms, tokens_NBS[0]))
    (grads, terms), _ = jax.lax.scan(accumulate, zeros, tokens_NBS)
    grads = jax.tree.map(lambda g: g / n_micro, grads)
    terms = terms._replace(**{k: getattr(terms, k) / n_micro for k in ('total', 'ce', 'mtp', 'balance')})

  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: (p - hyper.lr * u).astype(p.dtype), state.params, updates)
  # The step actually applied (after the cast to the params' dtype), against the weights it changes. An
  # AdamW step moves each weight by about lr, so the ratio is ~ lr / rms(weights); the demo run's largest is
  # 0.030 (its metrics.jsonl 'update_ratio', at the peak LR), and 1 means the update outweighs the weights.
  update_norm = optax.tree.norm(jax.tree.map(lambda n, o: n.astype(jnp.float32) - o.astype(jnp.float32), params,
                                             state.params))
  update_ratio = update_norm / jnp.maximum(optax.tree.norm(state.params), jnp.finfo(jnp.float32).tiny)
  ok = jnp.isfinite(terms.total) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  if max_update_ratio:
    ok &= update_ratio <= max_update_ratio
  bias = state.bias
  if len(nnx.to_flat_state(bias)):
    bias = update_router_bias(bias, terms.expert_counts, hyper.gamma)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = TrainState(keep(params, state.params), keep(bias, state.bias), keep(opt_state, state.opt_state),
                         state.skipped + (~ok).astype(jnp.int32), jnp.where(ok, 0, state.streak + 1))
  counts = {path: c.astype(jnp.float32) for path, c in terms.expert_counts.items()}
  metrics = {'loss': terms.total, 'ce': terms.ce, 'mtp': terms.mtp, 'balance': terms.balance,
             'grad_norm': grad_norm, 'update_ratio': update_ratio, 'ok': ok, 'skipped': new_state.skipped, 'streak': new_state.streak,
             # per MoE layer path: the busiest expert's load over the mean load ([L] stacked, [] one layer)
             'load_max_over_mean': {path: c.max(axis=-1) / c.mean(axis=-1) for path, c in counts.items()}}
  return new_state, metrics


def eval_step(graphdef: nnx.GraphDef, state: TrainState, tokens_BS) -> dict:
  terms = loss_fn(nnx.merge(graphdef, state.params, state.bias), tokens_BS)
  return {'ce': terms.ce}
