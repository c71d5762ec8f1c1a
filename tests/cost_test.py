"""The cost model against the published DeepSeek-V3 figures (technical report; ISCA'25 "Insights into
DeepSeek-V3" Tables 1-2) and against sums over the released checkpoint's tensor shapes."""

from absl.testing import parameterized

from deepseek_jax import cost
from deepseek_jax.config import PRESETS

# One layer of the released checkpoint (model.layers.N.*), shapes as stored ([out, in]).
MLA_TENSORS = {'q_a_proj': (1536, 7168), 'q_a_layernorm': (1536,), 'q_b_proj': (128 * 192, 1536),
               'kv_a_proj_with_mqa': (512 + 64, 7168), 'kv_a_layernorm': (512,), 'kv_b_proj': (128 * 256, 512),
               'o_proj': (7168, 128 * 128)}
EXPERT_TENSORS = {'gate_proj': (2048, 7168), 'up_proj': (2048, 7168), 'down_proj': (7168, 2048)}


def size(shape):
  n = 1
  for d in shape:
    n *= d
  return n


class CostTest(parameterized.TestCase):

  def test_v3_671b_published_figures(self):
    s = cost.summary(PRESETS['v3-671b'])
    self.assertTrue(671e9 <= s['total_params'] < 672e9)  # "671B total parameters" (report, abstract)
    self.assertTrue(37e9 <= s['active_params'] < 38e9)  # "37B activated for each token"
    self.assertEqual(s['kv_bytes_per_token'], 70_272)  # ISCA'25 Table 1: 70.272 KB per token
    self.assertAlmostEqual(s['train_flops_per_token'] / 1e9, 250, delta=2)  # ISCA'25 Table 2: 250 GFLOPs/token

  def test_v3_671b_from_checkpoint_shapes(self):
    c = PRESETS['v3-671b']
    mla = sum(size(s) for s in MLA_TENSORS.values())
    expert = sum(size(s) for s in EXPERT_TENSORS.values())
    self.assertEqual(cost.attention_params(c), mla)
    self.assertEqual(cost.expert_params(c), expert)
    gate = 256 * 7168 + 256  # mlp.gate.weight [256, 7168] and e_score_correction_bias [256]
    self.assertEqual(cost.moe_ffn_params(c), (256 + 1) * expert + gate)  # 256 routed + 1 shared expert
    norms = 2 * 7168  # input_layernorm, post_attention_layernorm
    dense_block = norms + mla + 3 * 7168 * 18432
    moe_block = norms + mla + (256 + 1) * expert + gate
    embed = 129280 * 7168
    s = cost.summary(c)
    self.assertEqual(s['total_params'], 2 * embed + 7168 + 3 * dense_block + 58 * moe_block)
    # The MTP layer (model.layers.61): enorm, hnorm, eh_proj [7168, 14336], a MoE block, shared_head.norm.
    self.assertEqual(s['mtp_params'], 3 * 7168 + 7168 * 14336 + moe_block)
    self.assertEqual(s['kv_bytes_per_token_naive'], 61 * 128 * (192 + 128) * 2)  # bf16 K [H, N + R], V [H, V]

  def test_flops_grow_with_context(self):
    c = PRESETS['demo']
    short, long = (cost.summary(c, seq_len=n)['train_flops_per_token'] for n in (256, 4096))
    per_layer_per_key = 3 * 2 * c.n_heads * (c.qk_head_dim + c.v_head_dim) / 2
    self.assertAlmostEqual(long - short, c.n_layers * per_layer_per_key * (4096 - 256))
