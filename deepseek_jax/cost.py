"""Analytic cost model: parameters, KV-cache bytes and training FLOPs per token (technical report Table 1;
ISCA'25 "Insights into DeepSeek-V3" Tables 1-2).

For v3-671b: 671.03e9 parameters in the main model, 37.55e9 active per token (8 routed + 1 shared expert,
embedding and head included), an absorbed-MLA cache of 70,272 bytes per token (bf16, 61 layers) against
4,997,120 for per-head K and V, and ~250e9 training FLOPs per token at 4K context (ISCA'25 Table 2).
The parameter counts equal the Variables of `jax.eval_shape` of the model (tests/model_test.py,
BigConfigTest); tests/cost_test.py derives the published totals.
"""

from __future__ import annotations

from deepseek_jax.config import ModelConfig

BF16_BYTES = 2


def attention_params(c: ModelConfig) -> int:
  h = c.n_heads
  if c.q_lora_rank == 0:
    q = c.dim * h * c.qk_head_dim
  else:
    q = c.dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
  kv = c.dim * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * h * (
      c.qk_nope_head_dim + c.v_head_dim)
  return q + kv + h * c.v_head_dim * c.dim


def expert_params(c: ModelConfig) -> int:
  return 3 * c.dim * c.moe_inter_dim


def moe_ffn_params(c: ModelConfig) -> int:
  gate = c.dim * c.n_routed_experts + (c.n_routed_experts if c.router_bias else 0)
  return (c.n_routed_experts + c.n_shared_experts) * expert_params(c) + gate


def block_params(c: ModelConfig, moe: bool) -> int:
  ffn = moe_ffn_params(c) if moe else 3 * c.dim * c.inter_dim
  return 2 * c.dim + attention_params(c) + ffn


def summary(cfg: ModelConfig, seq_len: int = 4096) -> dict[str, float]:
  """Parameter counts, cache bytes and training FLOPs per token (causal attention at `seq_len`)."""
  c = cfg
  embed = c.vocab_size * c.dim
  inactive = c.n_moe_layers * (c.n_routed_experts - c.n_activated_experts) * expert_params(c)
  total = (2 * embed + c.dim + c.n_dense_layers * block_params(c, moe=False) +
           c.n_moe_layers * block_params(c, moe=True))
  active = total - inactive
  mtp = c.n_mtp_layers * (3 * c.dim + 2 * c.dim * c.dim + block_params(c, moe=True))
  mtp_inactive = c.n_mtp_layers * (c.n_routed_experts - c.n_activated_experts) * expert_params(c)
  # Causal attention: on average a query sees seq_len / 2 keys; QK^T over N+R dims and PV over V dims.
  attn_fwd_per_layer = 2 * c.n_heads * (c.qk_head_dim + c.v_head_dim) * seq_len / 2
  # 6 FLOPs per active weight (forward 2, backward 4); the embedding is a lookup, not a matmul.
  train_flops = 6 * (active - embed) + 3 * c.n_layers * attn_fwd_per_layer
  mtp_flops = 6 * (mtp - mtp_inactive + embed) + 3 * c.n_mtp_layers * attn_fwd_per_layer
  return {
      'total_params': total,
      'active_params': active,
      'mtp_params': mtp,
      'mtp_active_params': mtp - mtp_inactive + 2 * embed if c.n_mtp_layers else 0,
      'kv_bytes_per_token': c.n_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * BF16_BYTES,
      'kv_bytes_per_token_naive': c.n_layers * c.n_heads * (c.qk_head_dim + c.v_head_dim) * BF16_BYTES,
      'train_flops_per_token': train_flops,
      'mtp_train_flops_per_token': mtp_flops if c.n_mtp_layers else 0,
  }
