"""Logits parity with transformers' DeepseekV3ForCausalLM (PyTorch, CPU, float32) on tiny random configs.

Each config is saved with `save_pretrained` and loaded with `load_hf`. Tolerance: max |logit difference| <=
1e-4 * max |logit| and the same argmax at every position. Together the configs cover q_lora_rank None and
set; sigmoid routing with n_group > 1 and topk_group < n_group, and with n_group 1; first_k_dense_replace 0,
1 and 2; YaRN on (sequences past original_max_position_embeddings) and off; several sequences per batch; a
nonzero random e_score_correction_bias (HF initialises it to zero); and DeepSeek-V2's softmax router.
"""

import os

import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from deepseek_jax.hf import load_hf
from tests.helpers import forward, require

torch = require('torch')
transformers = require('transformers')

YARN = {'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32, 'beta_fast': 32, 'beta_slow': 1,
        'mscale': 1.0, 'mscale_all_dim': 1.0}
BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, kv_lora_rank=24, max_position_embeddings=256,
            num_nextn_predict_layers=0)
CONFIGS = {
    # name: (model class, config kwargs, batch, sequence length)
    'q_lora_groups_yarn': ('DeepseekV3', dict(
        q_lora_rank=32, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, rope_scaling=YARN), 3, 80),
    'no_q_lora_one_group': ('DeepseekV3', dict(
        q_lora_rank=None, first_k_dense_replace=0, n_routed_experts=8, num_experts_per_tok=3, n_group=1,
        topk_group=1, routed_scaling_factor=1.0), 2, 40),
    'two_dense_yarn_mscale': ('DeepseekV3', dict(
        q_lora_rank=32, first_k_dense_replace=2, num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=3, routed_scaling_factor=2.5,
        rope_scaling={**YARN, 'factor': 8.0, 'mscale': 0.707, 'mscale_all_dim': 0.707}), 2, 96),
    'no_q_lora_groups_plain': ('DeepseekV3', dict(
        q_lora_rank=None, first_k_dense_replace=1, n_routed_experts=12, num_experts_per_tok=2, n_group=3,
        topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False), 4, 33),
    'v2_softmax_groups': ('DeepseekV2', dict(
        q_lora_rank=None, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, topk_method='group_limited_greedy', routed_scaling_factor=16.0), 2, 40),
}


def random_hf_model(kind, kwargs, seed):
  torch.manual_seed(seed)
  config = getattr(transformers, f'{kind}Config')(**{**BASE, **kwargs})
  model = getattr(transformers, f'{kind}ForCausalLM')(config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
    for name, buf in model.named_buffers():
      if name.endswith('e_score_correction_bias'):  # HF initialises it to zero; make it matter
        buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
  return model


def token_batch(vocab, batch, length, seed):
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, length))
  tokens[0, :5] = 7  # a repeated-token run: equal queries at different positions
  return tokens




class ParityTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name, *spec) for name, spec in CONFIGS.items()])
  def test_logits(self, kind, kwargs, batch, length):
    hf_model = random_hf_model(kind, kwargs, seed=len(kwargs))
    path = os.path.join(self.create_tempdir().full_path, 'ckpt')
    hf_model.save_pretrained(path)
    tokens = token_batch(hf_model.config.vocab_size, batch, length, seed=batch)
    with torch.no_grad():
      want = hf_model(torch.from_numpy(tokens)).logits.numpy()
    cfg, model = load_hf(path)
    if 'rope_scaling' in kwargs:
      self.assertTrue(cfg.yarn and length > cfg.original_seq_len)
    got = np.asarray(forward(model, jnp.asarray(tokens)).logits_BTW)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f'parity {self._testMethodName}: max|dlogit|/max|logit| = {err:.2e}')
    self.assertLessEqual(err, 1e-4)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
