"""4-bit routed experts in the model: quantized on load (load_hf, one device and a mesh) or from a model in
memory (held.experts_4bit), computing what full-precision experts with the dequantized weights compute, at
<= 0.57 stored bytes per parameter. (generate_test decodes a trained model with them and checks its
cross-entropy.)"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from deepseek_jax import held, quant4, sharding
from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.generate import generate
from deepseek_jax.hf import load_hf, save_hf
from tests.helpers import forward, random_model, require

EXPERTS = ('w1', 'w2', 'w3')


def expert_stacks(model):
  """Every routed-expert module of the model (the MoE layers' and MTP's)."""
  return [module for path, module in nnx.iter_graph(model) if path and path[-1] == 'experts']


def dequantized_copy(model, fmt, group):
  """The full-precision model with each expert weight replaced by dequantize(quantize(w)): the reference."""
  copy = nnx.merge(*nnx.split(model))
  for experts in expert_stacks(copy):
    for name in EXPERTS:
      w = getattr(experts, name)
      w.set_value(quant4.dequantize(quant4.quantize(w[...], fmt, group), fmt))
  return copy


@functools.cache
def checkpoint():
  from tests.hf_test import hf_tiny_checkpoint  # hidden 256, moe_intermediate 128: groups of 128 divide
  path = os.path.join(absltest.get_default_test_tmpdir(), 'experts4_ckpt')
  hf_tiny_checkpoint(path)
  return path


class Experts4Test(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    require('transformers')

  @parameterized.parameters(('int4', 128), ('mxfp4', 32))
  def test_load_hf_quantizes_the_experts(self, fmt, group):
    _, plain = load_hf(checkpoint())
    _, q = load_hf(checkpoint(), Runtime(weights4=fmt))
    experts, plain_experts = q.moe_layers.ffn.experts, plain.moe_layers.ffn.experts
    stored = 0
    for name in EXPERTS:
      want = quant4.quantize(getattr(plain_experts, name)[...], fmt, group)
      codes, scales = getattr(experts, name)[...], getattr(experts, name + '_scale')[...]
      self.assertEqual(codes.dtype, jnp.uint8)
      self.assertEqual(codes.shape[-2] * 2, getattr(plain_experts, name).shape[-2])  # two codes per byte
      np.testing.assert_array_equal(codes, want.codes)
      np.testing.assert_array_equal(np.asarray(scales, np.float32), np.asarray(want.scales, np.float32))
      stored += quant4.bytes_per_parameter(quant4.Packed(codes, scales))
    self.assertLessEqual(stored / 3, 0.57)  # 4 bits + scales: int4 g128 0.516, MXFP4 0.531
    self.assertEqual(q.dense_layers.attn.wq_a.kernel.dtype, jnp.float32)  # only the routed experts
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)))
    want = forward(dequantized_copy(plain, fmt, group), tokens).logits_BTW
    np.testing.assert_allclose(forward(q, tokens).logits_BTW, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with self.assertRaisesRegex(ValueError, 'no official checkpoint format'):
      save_hf(q.cfg, q, self.create_tempdir().full_path)

  def test_load_onto_a_mesh_equals_one_device(self):
    _, one = load_hf(checkpoint(), Runtime(weights4='int4'))
    mesh = sharding.make_mesh(data=2, expert=4)
    _, spread = load_hf(checkpoint(), Runtime(weights4='int4'), mesh)
    codes = spread.moe_layers.ffn.experts.w2[...]
    self.assertGreater(len(codes.sharding.device_set), 1)
    for a, b in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(spread))):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    prompts = [[5, 9, 33, 7], [100, 2, 4]]
    self.assertEqual(generate(spread, prompts, 6, mesh=mesh).tokens, generate(one, prompts, 6).tokens)

  def test_kernel_decodes_as_the_xla_path(self, fmt='int4', group=32):  # every format: quant4_gemm_test
    # The 4-bit GEMM kernel (interpret mode) on each decode layout of tiny's 8 experts top-2: 'gather' (1 token,
    # 2 copies), 'dense' over the distinct chosen experts (2 tokens, 4 copies), 'dense' over all (16 tokens).
    cfg = PRESETS['tiny']
    rng = np.random.default_rng(1)
    for gmm_impl, shape in (('auto', (1, 1)), ('dense', (1, 2)), ('auto', (2, 8))):
      xla, kernel = (held.experts_4bit(random_model(cfg, 3, rt=Runtime(gmm_impl=gmm_impl, weights4_impl=impl)),
                                       fmt, group) for impl in ('xla', 'interpret'))
      tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, shape))
      want = forward(xla, tokens).logits_BTW
      np.testing.assert_allclose(forward(kernel, tokens).logits_BTW, want, rtol=0, atol=1e-5 * np.abs(want).max())
    prompts = [[5, 9, 33, 7], [100, 2, 4]]
    self.assertEqual(generate(kernel, prompts, 5).tokens, generate(xla, prompts, 5).tokens)

  def test_errors(self):
    model = random_model(PRESETS['tiny'])
    q = held.experts_4bit(model, 'int4', 32)
    with self.assertRaisesRegex(ValueError, 'already holds quantized weights'):
      held.experts_4bit(q, 'mxfp4')
    with self.assertRaisesRegex(ValueError, 'Runtime.weights4'):
      Runtime(weights4='int3')
    with self.assertRaisesRegex(ValueError, 'Runtime.weights4_group'):
      Runtime(weights4='mxfp4', weights4_group=64)
    with self.assertRaisesRegex(ValueError, 'do not divide into int4 groups of 128'):
      held.experts_4bit(model, 'int4', 128)  # tiny's expert width 32


if __name__ == '__main__':
  absltest.main()
