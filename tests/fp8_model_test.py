"""The FP8 recipe in the model: which layers quantize, and how close FP8 stays to the unquantized model."""

import jax
import numpy as np
from absl.testing import absltest
from flax import nnx

from configs import tiny, v3_671b
from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.layers import Linear
from deepseek_jax.loss import loss_fn
from deepseek_jax.moe import RoutedExperts
from deepseek_jax.run_config import runtime
from tests.helpers import random_model

CFG = PRESETS['tiny'].replace(dim=128, n_heads=2, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64,
                              qk_rope_head_dim=64, v_head_dim=64, moe_inter_dim=128, inter_dim=256)


FP8 = Runtime(quant='fp8')


def losses_and_grads(cfg, tokens, rt=Runtime()):
  model = random_model(cfg, seed=4, rt=rt)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), tokens).total))
  return fn(params)


class Fp8ModelTest(absltest.TestCase):

  def test_which_layers_quantize(self):
    model = nnx.eval_shape(lambda: random_model(CFG, rt=FP8))
    linears = {'/'.join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, Linear)}
    self.assertIsNone(linears['head'].recipe)  # the output head stays high precision (paper §3.3.1)
    quantized = {name for name, m in linears.items() if m.recipe is not None}
    self.assertEqual(quantized, set(linears) - {'head'})  # attention, dense MLP, shared experts, MTP eh_proj
    self.assertIn('mtp/0/eh_proj', quantized)
    experts = [m for _, m in nnx.iter_graph(model) if isinstance(m, RoutedExperts)]
    self.assertTrue(experts and all(e.recipe is not None and e.gmm_impl == 'tiled' for e in experts))

  def test_dense_model_gradients_close_to_unquantized(self):
    cfg = CFG.replace(n_dense_layers=CFG.n_layers, n_mtp_layers=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 65), 0, cfg.vocab_size)
    loss, grads = losses_and_grads(cfg, tokens)
    loss8, grads8 = losses_and_grads(cfg, tokens, FP8)
    self.assertLess(abs(float(loss8) / float(loss) - 1), 0.01)
    flat = lambda g: np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])
    a, b = flat(grads), flat(grads8)
    # Every FP8 GEMM (forward, input gradient, weight gradient of each quantized projection) rounds its
    # operands to e4m3, a relative error of at most 2^-4 per element; n independent such errors add in
    # quadrature, so the gradient's relative error stays below 2^-4 sqrt(n). A wrong scale or block layout
    # breaks that by far (a factor-2 scale error alone is 100%).
    model = nnx.eval_shape(lambda: random_model(cfg, rt=FP8))
    n_gemms = 3 * sum(int(np.prod(m.kernel.shape[:-2]))  # stacked layers: one projection per layer
                      for _, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.recipe is not None)
    self.assertLess(np.linalg.norm(b - a) / np.linalg.norm(a), 2**-4 * np.sqrt(n_gemms))
    self.assertFalse(np.array_equal(a, b))  # the FP8 path really ran

  def test_moe_model_loss_and_routing_close_to_unquantized(self):
    # Gradients of a random MoE model differ more (cosine ~0.93 here): FP8 noise flips top-k choices of
    # tokens near a routing boundary, and those tokens' experts change. Loss and routing stay close.
    tokens = jax.random.randint(jax.random.key(1), (2, 65), 0, CFG.vocab_size)
    terms = [nnx.jit(lambda m: loss_fn(m, tokens))(random_model(CFG, seed=4, rt=rt)) for rt in (Runtime(), FP8)]
    self.assertLess(abs(float(terms[1].total) / float(terms[0].total) - 1), 0.01)
    counts = [np.concatenate([np.ravel(c) for c in t.expert_counts.values()]) for t in terms]
    self.assertLess(np.abs(counts[1] - counts[0]).sum() / counts[0].sum(), 0.15)

  def test_held_fp8_weights_are_not_trainable(self):
    from deepseek_jax.trainer import train
    config = tiny.get_config()
    config.runtime.fp8_weights = True
    with self.assertRaisesRegex(ValueError, 'fp8_weights'):
      train(config, self.create_tempdir().full_path)
    model = nnx.eval_shape(lambda: random_model(CFG, rt=Runtime(fp8_weights=True)))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    self.assertNotIn(('dense_layers', 'attn', 'wq_a', 'kernel'), params)  # HeldWeight, not Param
    self.assertIn(('head', 'kernel'), params)  # the head is never held in FP8

  def test_configs(self):
    self.assertEqual(runtime(v3_671b.get_config()).quant, 'fp8')  # V3 trained with FP8
    c = tiny.get_config()
    self.assertEqual(runtime(c).quant, 'none')
    c.runtime.quant = 'fp8'
    self.assertEqual(runtime(c).quant, 'fp8')
