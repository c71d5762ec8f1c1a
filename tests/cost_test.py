"""The cost model against the published DeepSeek-V3 figures (spec §1.2, §2.5; ISCA'25 Tables 1-2)."""

from absl.testing import parameterized

from deepseek_jax import cost
from deepseek_jax.config import PRESETS


class CostTest(parameterized.TestCase):

  def test_v3_671b(self):
    s = cost.summary(PRESETS['v3-671b'])
    self.assertEqual(round(s['total_params'] / 1e9, 2), 671.03)  # 671B main model
    self.assertEqual(round(s['active_params'] / 1e9, 2), 37.55)  # 37B active, emb + head included
    self.assertEqual(round(s['mtp_params'] / 1e9, 2), 11.61)  # MTP module's own weights
    self.assertEqual(round(s['mtp_active_params'] / 1e9, 2), 2.54)
    self.assertEqual(s['kv_bytes_per_token'], 70_272)  # "only 70 KB per token"
    self.assertEqual(s['kv_bytes_per_token_naive'], 4_997_120)
    self.assertAlmostEqual(s['train_flops_per_token'] / 1e9, 250, delta=2)  # "250 GFLOPS/token"

  def test_components(self):
    c = PRESETS['v3-671b']
    self.assertEqual(cost.attention_params(c) + 2 * c.dim, 187_107_328 + 2 * 7168)  # per-layer MLA
    self.assertEqual(cost.expert_params(c), 44_040_192)
    self.assertEqual(cost.moe_ffn_params(c), 11_320_164_608)

  def test_flops_grow_with_context(self):
    c = PRESETS['demo']
    short, long = (cost.summary(c, seq_len=n)['train_flops_per_token'] for n in (256, 4096))
    per_layer_per_key = 3 * 2 * c.n_heads * (c.qk_head_dim + c.v_head_dim) / 2
    self.assertAlmostEqual(long - short, c.n_layers * per_layer_per_key * (4096 - 256))
