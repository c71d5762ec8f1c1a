"""Meshes and shardings on 8 CPU devices: a training step on data / FSDP / expert meshes equals the
single-device step, FSDP divides the parameter bytes, and a checkpoint restores onto another mesh."""

import functools
import math
import os
import socket
import subprocess
import sys
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer
from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.optimizer import adamw
from deepseek_jax.train_step import Hyper, _grads_and_terms, init_train_state, train_step
from tests.helpers import random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = PRESETS['tiny']  # fp32; 8 experts in 4 groups, 1 dense + 2 MoE layers, one MTP module
HYPER = Hyper(lr=jnp.float32(1e-3), gamma=jnp.float32(1e-3), mtp_lambda=jnp.float32(0.3),
              balance_alpha=jnp.float32(1e-2))
TX = adamw()


@functools.partial(jax.jit, static_argnums=0)
def grads(graphdef, state, tokens_NBS):
  return _grads_and_terms(graphdef, state.params, state.bias, tokens_NBS[0], HYPER)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class MeshTest(parameterized.TestCase):

  def test_fill_and_errors(self):
    self.assertEqual(dict(sharding.make_mesh(data=-1, expert=2).shape), {'pipeline': 1, 'data': 4, 'expert': 2})
    self.assertEqual(dict(sharding.make_mesh(data=2, expert=-1, pipeline=2).shape),
                     {'pipeline': 2, 'data': 2, 'expert': 2})
    self.assertEqual(sharding.make_mesh(data=3, expert=2).devices.size, 6)  # the first 6 of 8
    with self.assertRaisesRegex(ValueError, 'needs 12 devices, this run has 8'):
      sharding.make_mesh(data=3, expert=4)
    with self.assertRaisesRegex(ValueError, 'only one mesh axis'):
      sharding.make_mesh(data=-1, expert=-1)
    with self.assertRaisesRegex(ValueError, 'do not divide by 3'):
      sharding.make_mesh(data=-1, expert=3)
    with self.assertRaisesRegex(ValueError, r'mesh.expert must be'):
      sharding.make_mesh(data=8, expert=0)

  def test_logical_specs(self):
    mesh = sharding.make_mesh(data=2, expert=4)
    spec = lambda axes, shape: sharding.logical_spec(axes, shape, mesh)
    self.assertEqual(spec(('layers', 'expert', 'embed', 'moe_mlp'), (2, 8, 64, 32)), P(None, 'expert', 'data', None))
    self.assertEqual(spec(('embed', 'kv_lora'), (64, 40)), P(('data', 'expert'), None))  # axes used once
    self.assertEqual(spec(('kv_lora', 'heads'), (32, 128)), P(('data', 'expert'), None))
    self.assertEqual(spec(('embed',), (6,)), P('data'))  # 2 divides 6, 2 x 4 does not
    self.assertEqual(spec(('embed',), (63,)), P(None))  # does not divide: stays whole (63 x 4 B: small)
    self.assertEqual(spec(('layers', 'router'), (2, 8)), P(None, ('data', 'expert')))
    # An axis the preferred dimension cannot take goes to the next FSDP dimension that divides.
    self.assertEqual(spec(('embed', 'vocab'), (6, 40)), P('data', 'expert'))
    self.assertEqual(spec(('layers', 'expert', 'embed', 'moe_mlp'), (2, 8, 63, 32)), P(None, 'expert', None, 'data'))

  def test_large_arrays_are_never_silently_replicated(self):
    mesh = jax.sharding.AbstractMesh((1, 2048, 1), sharding.MESH_AXES)
    with self.assertRaisesRegex(sharding.ReplicatedError,
                                r"head/kernel \(7168, 129280\) \(3,535 MiB; dims \('embed', 'vocab'\)\) would be "
                                r"replicated over mesh axes \['data'\] of mesh \{'pipeline': 1, 'data': 2048, "
                                r"'expert': 1\}"):
      sharding.logical_spec(('embed', 'vocab'), (7168, 129280), mesh, 'head/kernel')
    with self.assertLogs(level='WARNING'):  # opted in: reported, not raised
      self.assertEqual(sharding.logical_spec(('embed', 'vocab'), (7168, 129280), mesh, 'head', allow_replicated=True),
                       P(None, None))
    self.assertEqual(sharding.logical_spec(('layers', 'embed'), (61, 7168), mesh), P(None, None))  # 1.7 MB: small


class V3LayoutTest(parameterized.TestCase):
  """The real rules on V3-sized AbstractMeshes (no devices): every device holds ~1/devices of the weights."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.abstract = {preset: nnx.state(nnx.eval_shape(lambda p=preset: DeepSeekV3(PRESETS[p], Runtime(), nnx.Rngs(0))))
                    for preset in ('v3-671b', 'v2-lite-16b')}

  @parameterized.product(preset=('v3-671b', 'v2-lite-16b'),
                         sizes=((1, 256, 1), (1, 32, 8), (1, 1024, 1), (1, 128, 8), (1, 1024, 2), (1, 256, 8),
                                (2, 128, 8)))  # (pipeline, data, expert): 256, 1,024 and 2,048 devices
  def test_per_device_bytes(self, preset, sizes):
    mesh = jax.sharding.AbstractMesh(sizes, sharding.MESH_AXES)
    state = self.abstract[preset]
    specs = sharding.state_shardings(state, mesh)
    total = per_device = small = 0
    is_var = lambda x: isinstance(x, nnx.Variable)
    for variable, named in zip(jax.tree.leaves(state, is_leaf=is_var), jax.tree.leaves(specs, is_leaf=is_var)):
      itemsize = np.dtype(variable.dtype).itemsize
      nbytes, shard = math.prod(variable.shape) * itemsize, math.prod(named.get_value().shard_shape(variable.shape))
      total += nbytes
      per_device += shard * itemsize
      small += shard * itemsize if nbytes <= sharding.REPLICATED_LIMIT_BYTES else 0
    devices = math.prod(sizes)
    # (With pipeline=2 the embedding, dense blocks and head stay whole over 'pipeline' by design: 2-4% here.)
    self.assertLessEqual(per_device, 1.05 * total / devices + small)

  def test_v3_on_2048_data_devices_names_the_first_array_that_cannot_split(self):
    mesh = jax.sharding.AbstractMesh((1, 2048, 1), sharding.MESH_AXES)
    with self.assertRaisesRegex(sharding.ReplicatedError, r'dense_layers/attn/wkv_a/kernel \(3, 7168, 576\)'):
      sharding.state_shardings(self.abstract['v3-671b'], mesh)


class ShardedTrainStepTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    graphdef, state = init_train_state(random_model(CFG, seed=7), TX)
    cls.graphdef, cls.state = graphdef, state
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (1, 8, 17))
    tokens[0, :, 5] = 3  # a repeated token: some experts get crowded
    cls.tokens = jnp.asarray(tokens, jnp.int32)
    cls.want_grads, cls.want_terms = grads(graphdef, state, cls.tokens)
    cls.want_state, cls.want_metrics = jax.jit(functools.partial(train_step, graphdef, TX))(state, cls.tokens, HYPER)

  @parameterized.parameters((8, 1), (2, 4))
  def test_equals_single_device(self, data, expert):
    self._check_equal(data, expert)

  @pytest.mark.slow  # (absl's parameterized copies drop pytest marks: one method per mesh)
  def test_equals_single_device_1x8(self):
    self._check_equal(1, 8)

  @pytest.mark.slow
  def test_equals_single_device_4x2(self):
    self._check_equal(4, 2)

  def _check_equal(self, data, expert):
    mesh = sharding.make_mesh(data=data, expert=expert)
    shardings = sharding.state_shardings(self.state, mesh)
    state = jax.device_put(self.state, shardings)
    tokens = jax.device_put(self.tokens, sharding.batch_sharding(mesh, 3, 1))
    with jax.set_mesh(mesh):  # as the trainer runs: the MoE layers see the mesh and dispatch over 'expert'
      got_grads, terms = grads(self.graphdef, state, tokens)
      hlo = grads.lower(self.graphdef, state, tokens).as_text()
    # Expert parallelism is explicit: tokens all-gathered and outputs reduce-scattered over 'expert'.
    self.assertEqual('reduce_scatter' in hlo, expert > 1)
    # fp32, relative 1e-5: the loss, each parameter's gradient, and the expert counts exactly.
    self.assertLessEqual(rel(terms.total, self.want_terms.total), 1e-5)
    worst = max(jax.tree.leaves(jax.tree.map(rel, got_grads, self.want_grads)))
    self.assertLessEqual(worst, 1e-5)
    chex.assert_trees_all_equal(terms.expert_counts, self.want_terms.expert_counts)
    # The whole step (AdamW, router-bias update) with the state kept in its shardings.
    step = jax.jit(functools.partial(train_step, self.graphdef, TX), out_shardings=(shardings, None))
    with jax.set_mesh(mesh):
      new_state, metrics = step(state, tokens, HYPER)
    self.assertLessEqual(rel(metrics['loss'], self.want_metrics['loss']), 1e-5)
    self.assertLessEqual(rel(metrics['grad_norm'], self.want_metrics['grad_norm']), 1e-5)
    for got, want in zip(jax.tree.leaves(new_state.bias), jax.tree.leaves(self.want_state.bias)):
      np.testing.assert_array_equal(got, want)
    expert_w1 = new_state.params['moe_layers']['ffn']['experts']['w1']
    self.assertEqual(expert_w1.sharding.spec, P(None, 'expert' if expert > 1 else None, 'data' if data > 1 else None, None))

  @parameterized.parameters((8, 1), (2, 4))
  def test_fsdp_divides_parameter_bytes(self, data, expert):
    mesh = sharding.make_mesh(data=data, expert=expert)
    params = jax.device_put(self.state.params, sharding.state_shardings(self.state.params, mesh))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = [0] * 8
    for array in jax.tree.leaves(params):
      for shard in array.addressable_shards:
        per_device[list(mesh.devices.flat).index(shard.device)] += shard.data.nbytes
    # Each array is split 8 ways (experts over 'expert', model dimensions over the rest), but the router
    # biases and the few dimensions that do not divide.
    self.assertLess(max(per_device), 1.05 * total / 8)
    self.assertGreater(min(per_device), 0.95 * total / 8)

  def test_checkpoint_restores_onto_another_mesh(self):
    source = sharding.make_mesh(data=8)
    state = jax.device_put(self.state, sharding.state_shardings(self.state, source))
    directory = tempfile.mkdtemp()
    checkpoints = Checkpointer(directory, async_save=False)
    checkpoints.save(3, state, {'step': 3})
    checkpoints.close()
    target = sharding.make_mesh(data=2, expert=4)
    abstract = jax.eval_shape(lambda: self.state)
    shardings = sharding.state_shardings(abstract, target)
    restored = Checkpointer(directory).restore(sharding.with_shardings(abstract, shardings))
    self.assertEqual((restored.step, restored.meta, restored.skipped), (3, {'step': 3}, []))
    for got, want, spec in zip(jax.tree.leaves(restored.state), jax.tree.leaves(self.state), jax.tree.leaves(shardings)):
      np.testing.assert_array_equal(got, want)
      self.assertEqual(got.sharding, spec)


def tiny_run(workdir, steps, batch_size=4, microbatch_size=0, **mesh):
  """Trains the tiny config in this process (8 devices) and returns its per-step losses."""
  from configs import tiny
  from deepseek_jax.metrics import read_metrics
  from deepseek_jax.trainer import train
  config = tiny.get_config()
  config.steps, config.batch_size, config.checkpoint_every, config.eval_every = steps, batch_size, 3, 100
  config.microbatch_size = microbatch_size
  config.sample_tokens = 2
  config.mesh.update(mesh)
  train(config, workdir)
  return [row['loss'] for row in read_metrics(os.path.join(workdir, 'metrics.jsonl'))]


class ShardedTrainingRunTest(absltest.TestCase):

  def test_mesh_run_resumed_on_one_device_matches_a_single_device_run(self):
    # Two microbatches of 4 sequences: on one device accumulated, on the (2, 2, 2) mesh through the 1F1B
    # pipeline (one MoE block per stage) with experts spread over 'expert'.
    single = tiny_run(self.create_tempdir().full_path, 5, batch_size=8, microbatch_size=4)
    workdir = self.create_tempdir().full_path
    tiny_run(workdir, 3, batch_size=8, microbatch_size=4, data=2, expert=2, pipeline=2)  # 3 steps, a checkpoint
    resumed = tiny_run(workdir, 5, batch_size=8, microbatch_size=4)  # restored onto one device, 2 more steps
    self.assertLen(resumed, 5)
    np.testing.assert_allclose(resumed, single, rtol=1e-5)

  @pytest.mark.slow  # ~105 s; the default suite keeps 2-process loading (hf_test) and the mesh-run resume above
  def test_two_processes_of_four_devices_match_one_process_of_eight(self):
    mesh_flags = ['--config.mesh.data=2', '--config.mesh.expert=4', '--config.batch_size=8', '--config.steps=3',
                  '--config.checkpoint_every=3', '--config.eval_every=100', '--config.sample_tokens=2']
    workdir = self.create_tempdir().full_path
    with socket.socket() as s:  # a free loopback port
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, '-m', 'launch.train', '--config=configs/tiny.py', f'--workdir={workdir}', '--cpu_devices=4',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}', *mesh_flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
      outputs = [p.communicate(timeout=420)[0] for p in processes]
    finally:
      for p in processes:
        p.kill()
    for p, out in zip(processes, outputs):
      self.assertEqual(p.returncode, 0, out[-3000:])
    from deepseek_jax.metrics import read_metrics
    two = [row['loss'] for row in read_metrics(os.path.join(workdir, 'metrics.jsonl'))]
    one = tiny_run(self.create_tempdir().full_path, 3, batch_size=8, data=2, expert=4)
    self.assertLen(two, 3)
    np.testing.assert_allclose(two, one, rtol=1e-5)
    from deepseek_jax.trainer import restore_model
    _, model, step = restore_model(workdir)  # the checkpoint both processes wrote, onto one device to decode
    self.assertEqual(step, 3)
    self.assertEqual(model.head.kernel[...].sharding.device_set, {jax.devices()[0]})


if __name__ == '__main__':
  absltest.main()
