"""Expert-parallel dispatch on 8 CPU devices: the all-to-all dispatch equals the single-device MoE, and its
real ragged all-to-all (which XLA:CPU cannot run) lowers for TPU and CUDA."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from deepseek_jax import expert_parallel, sharding
from deepseek_jax.config import Runtime
from deepseek_jax.train_step import init_train_state
from tests.helpers import random_model
from tests.sharding_test import CFG, TX, grads, rel

A2A = Runtime(ep_dispatch='all_to_all')


class AllToAllTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.graphdef, cls.state = init_train_state(random_model(CFG, seed=7, rt=A2A), TX)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 8, 17))
    tokens[0, :, 5] = 3  # a repeated token: some experts get crowded, some devices receive more
    cls.tokens = jnp.asarray(tokens, jnp.int32)
    cls.want_grads, cls.want_terms = grads(cls.graphdef, cls.state, cls.tokens)

  def check(self, data, expert):
    mesh = sharding.make_mesh(data=data, expert=expert)
    state = jax.device_put(self.state, sharding.state_shardings(self.state, mesh))
    tokens = jax.device_put(self.tokens, sharding.batch_sharding(mesh, 3, 1))
    with jax.set_mesh(mesh):
      got_grads, terms = grads(self.graphdef, state, tokens)
    # fp32, relative 1e-5: the loss and each parameter's gradient; the expert counts exactly.
    self.assertLessEqual(rel(terms.total, self.want_terms.total), 1e-5)
    self.assertLessEqual(max(jax.tree.leaves(jax.tree.map(rel, got_grads, self.want_grads))), 1e-5)
    chex.assert_trees_all_equal(terms.expert_counts, self.want_terms.expert_counts)

  def test_equals_single_device(self):
    self.check(2, 4)

  @pytest.mark.slow
  def test_equals_single_device_one_expert_per_device(self):
    self.check(1, 8)

  def test_emulation_follows_the_documented_semantics(self):
    # Device i sends (i + 1) rows to every device; receivers stack them by sender. Checked against the
    # definition written out with numpy.
    mesh = sharding.make_mesh(data=1, expert=4)
    ep, m = 4, 10
    operand = np.arange(ep * m, dtype=np.float32).reshape(ep, m) + 0.5

    def local(operand):
      me = jax.lax.axis_index('expert')
      sizes = jnp.full((ep,), me + 1, jnp.int32)
      offsets = jnp.arange(ep, dtype=jnp.int32) * 2  # overlapping slices are allowed
      landing = jnp.full((ep,), me * (me + 1) // 2, jnp.int32)  # after senders 0 .. me - 1
      recv = jnp.arange(1, ep + 1, dtype=jnp.int32)
      return expert_parallel._emulated_ragged_all_to_all(operand[0], jnp.full((16,), -1.0), offsets, sizes,
                                                         landing, recv)[None]

    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=jax.P('expert'), out_specs=jax.P('expert'),
                                axis_names={'expert'}))(operand)
    want = np.full((ep, 16), -1.0, np.float32)
    for receiver in range(ep):
      for sender in range(ep):
        land = sender * (sender + 1) // 2
        want[receiver, land:land + sender + 1] = operand[sender, 2 * receiver:2 * receiver + sender + 1]
    np.testing.assert_array_equal(got, want)

  def test_ragged_all_to_all_lowers_for_tpu_and_cuda(self):
    graphdef, state = init_train_state(random_model(CFG, seed=7, rt=A2A.replace(gmm_impl='ragged_dot')), TX)
    mesh = sharding.make_mesh(data=2, expert=4)
    real = expert_parallel._ragged_all_to_all
    with jax.set_mesh(mesh), mock.patch.object(expert_parallel, '_emulated_ragged_all_to_all', real):
      for platform in ('tpu', 'cuda'):
        text = grads.trace(graphdef, state, self.tokens).lower(lowering_platforms=(platform,)).as_text()
        # Forward there and back for rows and expert ids, and the transposes in the backward pass.
        self.assertGreaterEqual(text.count('ragged_all_to_all'), 5, platform)


if __name__ == '__main__':
  absltest.main()
