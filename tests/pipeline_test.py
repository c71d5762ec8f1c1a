"""Pipeline parallelism on 8 CPU devices: gradients and loss of 1F1B / DualPipeV / GPipe steps on
(data, expert, pipeline) meshes equal the single-device step accumulated over the same microbatches."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized
from flax import nnx

from deepseek_jax import pipeline, sharding
from deepseek_jax.config import PRESETS
from deepseek_jax.optimizer import adamw
from deepseek_jax.train_step import Hyper, _grads_and_terms, init_train_state, train_step
from tests.helpers import random_model
from tests.sharding_test import rel

HYPER = Hyper(lr=jnp.float32(1e-3), gamma=jnp.float32(1e-3), mtp_lambda=jnp.float32(0.3),
              balance_alpha=jnp.float32(1e-2))
TX = adamw()


def setup(n_layers: int, n_micro: int):
  """A tiny model with n_layers - 1 MoE blocks, random microbatches [N, 4, 17] with a crowded token, and
  the single-device reference: grads, loss terms, and the whole step (AdamW, bias update)."""
  cfg = PRESETS['tiny'].replace(n_layers=n_layers)
  graphdef, state = init_train_state(random_model(cfg, seed=7), TX)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (n_micro, 4, 17))
  tokens[:, :, 5] = 3
  tokens = jnp.asarray(tokens, jnp.int32)
  step = jax.jit(functools.partial(train_step, graphdef, TX))
  return graphdef, state, tokens, step(state, tokens, HYPER)


@functools.lru_cache(maxsize=None)
def reference(n_layers: int, n_micro: int):
  graphdef, state, tokens, (new_state, metrics) = setup(n_layers, n_micro)

  @jax.jit
  def accumulated(state, tokens):
    outs = [_grads_and_terms(graphdef, state.params, state.bias, tokens[i], HYPER) for i in range(n_micro)]
    grads = jax.tree.map(lambda *g: sum(g) / n_micro, *[o[0] for o in outs])
    counts = jax.tree.map(lambda *c: sum(c), *[o[1].expert_counts for o in outs])
    return grads, sum(o[1].total for o in outs) / n_micro, counts

  return graphdef, state, tokens, new_state, metrics, accumulated(state, tokens)


class PipelineTest(parameterized.TestCase):

  @parameterized.parameters(
      (1, 1, 4, '1f1b', 5, 4),  # 4 stages of one MoE block
      (2, 2, 2, 'dualpipev', 5, 4))  # 4 chunks in a V over 2 stages; embedding, head and MTP on device 0
  def test_gradients_equal_single_device(self, data, expert, stages, schedule, n_layers, n_micro):
    self._check_gradients(data, expert, stages, schedule, n_layers, n_micro)

  # 1F1B on data x expert-parallel dispatch x pipeline: test_whole_step_equals_single_device runs this mesh
  # and schedule by default, every parameter after a step that carries the gradient's precision.
  @pytest.mark.slow
  def test_1f1b_on_data_expert_pipeline_equals_single_device(self):
    self._check_gradients(2, 2, 2, '1f1b', 5, 4)

  @pytest.mark.slow
  def test_1f1b_with_data_on_4_stages_equals_single_device(self):
    self._check_gradients(2, 1, 4, '1f1b', 5, 4)

  @pytest.mark.slow  # (absl's parameterized copies drop pytest marks: one method per case)
  def test_dualpipev_on_4_stages_equals_single_device(self):
    self._check_gradients(1, 2, 4, 'dualpipev', 9, 8)  # 8 chunks of one MoE block, 8 microbatches

  @pytest.mark.slow
  def test_gpipe_equals_single_device(self):
    self._check_gradients(4, 1, 2, 'gpipe', 5, 4)

  def _check_gradients(self, data, expert, stages, schedule, n_layers, n_micro):
    graphdef, state, tokens, _, _, (want_grads, want_loss, want_counts) = reference(n_layers, n_micro)
    mesh = sharding.make_mesh(data=data, expert=expert, pipeline=stages)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 3, 1))
    with jax.set_mesh(mesh):
      grads, terms = jax.jit(functools.partial(pipeline.pipeline_grads, graphdef, mesh=mesh, schedule=schedule))(
          state.params, state.bias, tokens, HYPER)
    # fp32, relative 1e-5: the loss, every parameter's gradient; the expert counts exactly.
    self.assertLessEqual(rel(terms.total, want_loss), 1e-5)
    worst = max(jax.tree.leaves(jax.tree.map(rel, grads, want_grads)))
    self.assertLessEqual(worst, 1e-5)
    chex.assert_trees_all_equal(terms.expert_counts, want_counts)

  def test_whole_step_equals_single_device(self):
    # A plain gradient step (identity transformation), as in train_step_test's microbatch test: an AdamW first
    # step is g / (|g| + 1e-8) per element, which turns rounding-level differences of near-zero gradients into
    # updates differing by up to lr (AdamW itself is elementwise; sharding_test runs it on meshes). lr 1000
    # makes the update dwarf the parameters it is added to, so the new parameters carry the gradient's
    # precision instead of the fp32 rounding of old + small update.
    sgd, hyper = optax.identity(), HYPER._replace(lr=jnp.float32(1e3))
    graphdef, state, tokens, *_ = reference(5, 4)
    graphdef, state = init_train_state(nnx.merge(graphdef, state.params, state.bias), sgd)
    want_state, want_metrics = jax.jit(functools.partial(train_step, graphdef, sgd))(state, tokens, hyper)
    mesh = sharding.make_mesh(data=2, expert=2, pipeline=2)
    shardings = sharding.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 3, 1))
    with jax.set_mesh(mesh):
      new_state, metrics = jax.jit(functools.partial(train_step, graphdef, sgd, pipeline=(mesh, '1f1b')),
                                   out_shardings=(shardings, None))(state, tokens, hyper)
    # Loss, gradient norm and parameters as one device (fp32, relative 1e-5); router biases moved identically.
    self.assertLessEqual(rel(metrics['loss'], want_metrics['loss']), 1e-5)
    self.assertLessEqual(rel(metrics['grad_norm'], want_metrics['grad_norm']), 1e-5)
    for got, want in zip(jax.tree.leaves(new_state.bias), jax.tree.leaves(want_state.bias)):
      np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want_state.params)):
      self.assertLessEqual(rel(got, want), 1e-5)
    moe_w1 = new_state.params['moe_layers']['ffn']['experts']['w1']
    self.assertEqual(moe_w1.sharding.spec[:2], ('pipeline', 'expert'))  # each stage stores its own blocks

  def test_buffers_do_not_grow_with_microbatches(self):
    # Stored chunk inputs per device: 1F1B P (the P - 1 it holds for backwards plus one received ahead of its
    # forward), DualPipeV 2P + 2 (DualPipe's PP + 1 = 2P + 1, plus one received ahead), for any M.
    for name, stages, held in (('1f1b', 4, 4), ('dualpipev', 4, 10), ('1f1b', 8, 8), ('dualpipev', 8, 18)):
      small, large = pipeline.make_plan(name, stages, 16), pipeline.make_plan(name, stages, 64)
      self.assertEqual((small.act_slots, small.grad_slots), (large.act_slots, large.grad_slots))
      self.assertEqual(small.act_slots, held)
    self.assertEqual(pipeline.make_plan('gpipe', 4, 16).act_slots, 16)  # GPipe holds every microbatch

  def test_errors_name_the_cause(self):
    graphdef, state, tokens, *_ = reference(5, 4)
    mesh = sharding.make_mesh(data=1, expert=1, pipeline=4)
    with self.assertRaisesRegex(ValueError, 'n_moe_layers=4 does not divide by 8'):
      pipeline.pipeline_grads(graphdef, state.params, state.bias, tokens, HYPER, sharding.make_mesh(pipeline=8),
                              '1f1b')
    with self.assertRaisesRegex(ValueError, 'schedule must be one of'):
      pipeline.pipeline_grads(graphdef, state.params, state.bias, tokens, HYPER, mesh, 'zb-h1')
    with self.assertRaisesRegex(ValueError, 'needs at least 2 x 4 devices = 8 microbatches'):
      pipeline.make_plan('dualpipev', 4, 4)
    with self.assertRaisesRegex(ValueError, 'microbatch size 4 does not divide'):
      pipeline.pipeline_grads(graphdef, state.params, state.bias, tokens, HYPER,
                              sharding.make_mesh(data=8, pipeline=1), '1f1b')


if __name__ == '__main__':
  absltest.main()
