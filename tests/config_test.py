"""ModelConfig and Runtime: official JSON and HF config.json readers, validation errors, presets."""

import dataclasses

from absl.testing import parameterized

from deepseek_jax.config import PRESETS, ModelConfig, Runtime
from deepseek_jax.hf_config import from_hf, to_hf
from tests.helpers import require

# inference/configs/*.json at DeepSeek-V3 9b4e978, verbatim.
CONFIG_671B = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
               "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
               "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
               "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
               "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}
CONFIG_16B = {"vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
              "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
              "n_activated_experts": 6, "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512,
              "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mscale": 0.707}
CONFIG_236B = {"vocab_size": 102400, "dim": 5120, "inter_dim": 12288, "moe_inter_dim": 1536, "n_layers": 60,
               "n_dense_layers": 1, "n_heads": 128, "n_routed_experts": 160, "n_shared_experts": 2,
               "n_activated_experts": 6, "n_expert_groups": 8, "n_limited_groups": 3, "route_scale": 16.0,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128}
# deepseek-ai/DeepSeek-V3 config.json on the Hugging Face hub, architecture block.
HUB_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
          "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
          "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128,
          "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
          "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
          "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
          "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                           "original_max_position_embeddings": 4096, "type": "yarn"},
          "num_nextn_predict_layers": 1, "moe_layer_freq": 1, "ep_size": 1, "hidden_act": "silu",
          "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
          "torch_dtype": "bfloat16", "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                             "quant_method": "fp8", "weight_block_size": [128, 128]}}

ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != 'norm_topk_prob']


def arch(cfg):
  """The architecture fields, with top-k renormalisation resolved."""
  return {name: getattr(cfg, name) for name in ARCH_FIELDS} | {'renormalize_topk': cfg.renormalize_topk}


class OfficialConfigTest(parameterized.TestCase):

  def test_671b_reads_every_field(self):
    cfg = ModelConfig.from_official(CONFIG_671B)
    for key, value in CONFIG_671B.items():
      if key != 'dtype':  # the official dtype is the weight storage format, not ours
        self.assertEqual(getattr(cfg, key), value, key)
    self.assertTrue(cfg.router_bias)  # the official Gate has a bias exactly when dim == 7168
    self.assertTrue(cfg.renormalize_topk)
    self.assertTrue(cfg.yarn)  # ModelArgs.max_seq_len 16384 > original_seq_len 4096
    self.assertAlmostEqual(cfg.softmax_scale, 0.13523378, places=7)  # 192^-0.5 * (0.1 ln 40 + 1)^2

  def test_16b_and_236b_defaults(self):
    lite = ModelConfig.from_official(CONFIG_16B)
    self.assertEqual((lite.score_func, lite.n_expert_groups, lite.router_bias, lite.renormalize_topk),
                     ('softmax', 1, False, False))
    self.assertEqual(lite.mscale, 0.707)
    v2 = ModelConfig.from_official(CONFIG_236B)
    self.assertEqual((v2.n_expert_groups, v2.n_limited_groups, v2.route_scale, v2.mscale), (8, 3, 16.0, 1.0))

  def test_unknown_official_key(self):
    with self.assertRaisesRegex(ValueError, 'n_experts'):
      ModelConfig.from_official({**CONFIG_16B, 'n_experts': 3})

  def test_presets_match_official(self):
    v3 = PRESETS['v3-671b']
    self.assertEqual(arch(v3), arch(ModelConfig.from_official(CONFIG_671B, max_seq_len=163840, n_mtp_layers=1)))
    self.assertEqual(arch(PRESETS['v2-lite-16b']), arch(ModelConfig.from_official(CONFIG_16B)))
    for name in ('tiny', 'demo', 'v3-671b'):  # every V3-style preset carries one MTP module
      self.assertEqual(PRESETS[name].n_mtp_layers, 1, name)
      self.assertEqual(PRESETS[name].score_func, 'sigmoid', name)


class HFConfigTest(parameterized.TestCase):

  def test_hub_v3(self):
    cfg = from_hf(HUB_V3)
    self.assertEqual(arch(cfg), arch(PRESETS['v3-671b']) | {'init_std': 0.006})
    self.assertEqual(cfg.rope_attention_factor, 1.0)

  def test_transformers_5_layout(self):
    transformers = require('transformers')
    hf = transformers.DeepseekV3Config(
        rope_scaling=HUB_V3['rope_scaling'], max_position_embeddings=163840).to_dict()
    self.assertIn('rope_parameters', hf)  # transformers 5 writes rope_parameters, the hub rope_scaling
    self.assertEqual(arch(from_hf(hf)), arch(from_hf(HUB_V3)) | {'init_std': 0.02})

  def test_attention_factor_without_mscale(self):
    # transformers scales cos/sin by 0.1 ln(s) + 1 when mscale / mscale_all_dim are absent, and the softmax not.
    rope = {'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 64}
    cfg = from_hf({**HUB_V3, 'rope_scaling': rope, 'max_position_embeddings': 256})
    self.assertAlmostEqual(cfg.rope_attention_factor, 0.1 * 1.3862943611198906 + 1)
    self.assertAlmostEqual(cfg.softmax_scale, 192**-0.5)

  @parameterized.parameters('tiny', 'demo', 'v2-lite-16b', 'v3-671b')
  def test_round_trip(self, name):
    cfg = PRESETS[name]
    self.assertEqual(arch(from_hf(to_hf(cfg))), arch(cfg))

  @parameterized.parameters(
      ('hidden_act', 'gelu'), ('tie_word_embeddings', True), ('rope_interleave', False), ('attention_bias', True),
      ('model_type', 'llama'), ('topk_method', 'sinkhorn'))
  def test_unsupported_key(self, key, value):
    with self.assertRaisesRegex(ValueError, key):
      from_hf({**HUB_V3, key: value})

  def test_missing_key(self):
    hf = dict(HUB_V3)
    del hf['kv_lora_rank']
    with self.assertRaisesRegex(ValueError, 'kv_lora_rank'):
      from_hf(hf)

  def test_grouped_sigmoid_gate_without_bias(self):
    # The official gate scores groups by their max without a bias; transformers' V3 always sums the top 2.
    small = ModelConfig.from_official({**CONFIG_671B, 'dim': 1024})
    self.assertFalse(small.router_bias)
    with self.assertRaisesRegex(ValueError, 'router_bias'):
      to_hf(small)
    self.assertFalse(from_hf(to_hf(small.replace(n_expert_groups=1, n_limited_groups=1))).router_bias)
    with self.assertRaisesRegex(ValueError, 'topk_method'):
      from_hf({**HUB_V3, 'topk_method': 'greedy'})

  def test_yarn_needs_longer_context(self):
    with self.assertRaisesRegex(ValueError, 'original_max_position_embeddings'):
      from_hf({**HUB_V3, 'max_position_embeddings': 4096})


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('topk_above_experts', dict(n_activated_experts=9), 'n_activated_experts'),
      ('experts_not_divisible', dict(n_routed_experts=10, n_expert_groups=4, n_activated_experts=2), 'n_routed_experts'),
      ('limited_above_groups', dict(n_limited_groups=5), 'n_limited_groups'),
      ('topk_above_kept_groups', dict(n_limited_groups=1, n_activated_experts=3), 'n_activated_experts'),
      ('odd_rope_dim', dict(qk_rope_head_dim=7), 'qk_rope_head_dim'),
      ('bad_score_func', dict(score_func='relu'), 'score_func'),
      ('dense_above_layers', dict(n_dense_layers=4), 'n_dense_layers'),
      ('zero_heads', dict(n_heads=0), 'n_heads'),
      ('negative_q_lora', dict(q_lora_rank=-1), 'q_lora_rank'),
      ('rope_factor_below_one', dict(rope_factor=0.5), 'rope_factor'),
      ('one_expert_per_biased_group', dict(n_routed_experts=4, n_expert_groups=4, n_limited_groups=2,
                                           n_activated_experts=2), 'n_expert_groups'),
  )
  def test_invalid(self, changes, field):
    with self.assertRaisesRegex(ValueError, f'ModelConfig.{field}'):
      PRESETS['tiny'].replace(**changes)

  @parameterized.named_parameters(
      ('bad_dtype', dict(param_dtype='int8'), 'param_dtype'),
      ('bad_gmm_impl', dict(gmm_impl='blocked'), 'gmm_impl'),
      ('bad_linear_impl', dict(linear_impl='blas'), 'linear_impl'),
      ('bad_weights4', dict(weights4='int8'), 'weights4'),
      ('bad_weights4_group', dict(weights4='mxfp4', weights4_group=128), 'weights4_group'),
      ('bad_quant', dict(quant='int4'), 'quant'),
      ('bad_fp8_impl', dict(fp8_impl='cuda'), 'fp8_impl'),
      ('bad_weights4_impl', dict(weights4_impl='triton'), 'weights4_impl'),
      ('bad_dispatch', dict(ep_dispatch='ring'), 'ep_dispatch'),
      ('zero_kv_block', dict(kv_block=0), 'kv_block'),
  )
  def test_invalid_runtime(self, changes, field):
    with self.assertRaisesRegex(ValueError, f'Runtime.{field}'):
      Runtime(**changes)

  def test_architecture_and_runtime_share_no_field(self):
    arch_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    self.assertFalse(arch_fields & {f.name for f in dataclasses.fields(Runtime)})
