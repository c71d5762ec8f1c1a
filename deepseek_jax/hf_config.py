"""Hugging Face DeepSeek-V2/V3 `config.json`: read into a `ModelConfig`, write one back.

Two layouts are read: the hub's (`rope_scaling`) and transformers 5's (`rope_parameters`). The group score of
group-limited routing follows the official `Gate.forward`: the sum of a group's top-2 scores when the gate has a
correction bias, its max score otherwise. transformers' DeepseekV3 always holds a bias (zeros unless the
checkpoint has one) and always sums the top 2, so a DeepSeek-V3 config with several groups but no
`noaux_tc` bias has no official meaning and is refused, as is writing such a model.
"""

from __future__ import annotations

from typing import Any, Mapping

from deepseek_jax.config import ModelConfig, yarn_mscale


_NUMBERS = ('vocab_size', 'hidden_size', 'intermediate_size', 'moe_intermediate_size', 'num_hidden_layers',
            'first_k_dense_replace', 'num_attention_heads', 'n_routed_experts', 'n_shared_experts',
            'num_experts_per_tok', 'n_group', 'topk_group', 'routed_scaling_factor', 'q_lora_rank', 'kv_lora_rank',
            'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'max_position_embeddings', 'rope_theta',
            'rms_norm_eps', 'initializer_range', 'num_nextn_predict_layers')
_ROPE_NUMBERS = ('rope_theta', 'factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow', 'mscale',
                 'mscale_all_dim', 'attention_factor')


def from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """Reads a Hugging Face DeepSeek-V2/V3 `config.json` dict."""
  rope_key = 'rope_parameters' if hf.get('rope_parameters') else 'rope_scaling'
  for where, keys in (('', (hf, _NUMBERS)), (f'{rope_key}.', (hf.get(rope_key) or {}, _ROPE_NUMBERS))):
    table, names = keys
    for key in names:  # sizes written as strings fail here, named, not as a TypeError deep inside
      value = table.get(key)
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f'config.json: {where}{key}={value!r} must be a number')
  return ModelConfig(**{**_kwargs(hf), **overrides})


def _kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
  model_type = hf.get('model_type', 'deepseek_v3')
  if model_type not in ('deepseek_v3', 'deepseek_v2'):
    raise ValueError(f'config.json: model_type {model_type!r} is not deepseek_v3 or deepseek_v2')

  def get(key, default=None, *, required=False):
    if key not in hf or hf[key] is None:
      if required:
        raise ValueError(f'config.json: missing required key {key!r}')
      return default
    return hf[key]

  for key, want in (('hidden_act', 'silu'), ('attention_bias', False), ('tie_word_embeddings', False),
                    ('rope_interleave', True), ('moe_layer_freq', 1)):
    if get(key, want) != want:
      raise ValueError(f'config.json: {key}={hf[key]!r} is not supported (DeepSeek uses {want!r})')
  # num_key_value_heads is not read: MLA derives every head's K and V from the shared latent.
  n_heads = get('num_attention_heads', required=True)

  v3 = model_type == 'deepseek_v3'
  topk_method = get('topk_method', 'noaux_tc' if v3 else 'greedy')
  kwargs = dict(
      vocab_size=get('vocab_size', required=True),
      dim=get('hidden_size', required=True),
      inter_dim=get('intermediate_size', required=True),
      moe_inter_dim=get('moe_intermediate_size', required=True),
      n_layers=get('num_hidden_layers', required=True),
      n_dense_layers=get('first_k_dense_replace', 0),
      n_heads=n_heads,
      n_routed_experts=get('n_routed_experts', required=True),
      n_shared_experts=get('n_shared_experts', 0),
      n_activated_experts=get('num_experts_per_tok', required=True),
      n_expert_groups=get('n_group', 1),
      n_limited_groups=get('topk_group', 1),
      score_func=get('scoring_func', 'sigmoid' if v3 else 'softmax'),
      route_scale=float(get('routed_scaling_factor', 1.0)),
      q_lora_rank=get('q_lora_rank', 0),
      kv_lora_rank=get('kv_lora_rank', required=True),
      qk_nope_head_dim=get('qk_nope_head_dim', required=True),
      qk_rope_head_dim=get('qk_rope_head_dim', required=True),
      v_head_dim=get('v_head_dim', required=True),
      max_seq_len=get('max_position_embeddings', required=True),
      router_bias=topk_method == 'noaux_tc',
      norm_topk_prob=bool(get('norm_topk_prob', v3)),
      norm_eps=float(get('rms_norm_eps', 1e-6)),
      n_mtp_layers=get('num_nextn_predict_layers', get('num_mtp_layers', 0)),
      init_std=float(get('initializer_range', 0.006)),
  )
  if topk_method not in ('noaux_tc', 'greedy', 'group_limited_greedy'):
    raise ValueError(f'config.json: topk_method {topk_method!r} is not supported')
  if v3 and topk_method != 'noaux_tc' and kwargs['n_expert_groups'] > 1:
    raise ValueError(f'config.json: topk_method {topk_method!r} with n_group={kwargs["n_expert_groups"]} is '
                     'ambiguous for deepseek_v3 (transformers sums the top-2 scores per group with a zero bias, '
                     'the official gate without a bias takes the max): use noaux_tc')
  kwargs.update(_hf_rope(hf, kwargs['max_seq_len']))
  return kwargs


def _hf_rope(hf: Mapping[str, Any], max_seq_len: int) -> dict[str, Any]:
  """Maps HF `rope_scaling` (hub) or `rope_parameters` (transformers 5) onto the official YaRN fields."""
  rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind == 'default':
    # Plain RoPE: YaRN stays inactive because the "original" length covers the whole context.
    return dict(rope_theta=theta, original_seq_len=max(max_seq_len, ModelConfig.original_seq_len))
  if kind != 'yarn':
    raise ValueError(f'config.json: rope_scaling type {kind!r} is not supported (DeepSeek uses yarn)')
  if not rope.get('truncate', True):
    raise ValueError('config.json: rope_scaling.truncate=False is not the DeepSeek YaRN')
  original = rope.get('original_max_position_embeddings')
  if original is None:
    raise ValueError('config.json: rope_scaling.original_max_position_embeddings is required for yarn')
  if max_seq_len <= original:
    raise ValueError(
        f'config.json: max_position_embeddings={max_seq_len} must exceed '
        f'rope_scaling.original_max_position_embeddings={original} for YaRN to apply')
  factor = rope.get('factor') or max_seq_len / original
  mscale, mscale_all_dim = rope.get('mscale'), rope.get('mscale_all_dim')
  attention_factor = rope.get('attention_factor')
  if attention_factor is None:  # transformers' _compute_yarn_parameters
    if mscale and mscale_all_dim:
      attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
      attention_factor = yarn_mscale(factor, 1.0)
  return dict(
      rope_theta=theta,
      rope_factor=float(factor),
      original_seq_len=int(original),
      beta_fast=float(rope.get('beta_fast') or 32),
      beta_slow=float(rope.get('beta_slow') or 1),
      # HF scales the softmax by mscale(factor, mscale_all_dim)^2, the official code by mscale(factor, mscale)^2.
      mscale=float(mscale_all_dim or 0.0),
      rope_attention_factor=float(attention_factor),
  )


def to_hf(c: ModelConfig, param_dtype: str = 'float32') -> dict[str, Any]:
  """The Hugging Face `config.json` dict for this architecture (classic hub layout), weights in param_dtype."""
  if c.score_func == 'sigmoid':
    model_type, architecture = 'deepseek_v3', 'DeepseekV3ForCausalLM'
    topk_method = 'noaux_tc' if c.router_bias else 'greedy'
    if not c.router_bias and c.n_expert_groups > 1:
      raise ValueError('ModelConfig.router_bias: a grouped sigmoid gate without a correction bias scores groups '
                       'by their max (official Gate.forward); transformers\' DeepseekV3 cannot express that')
  else:
    if c.router_bias:
      raise ValueError('ModelConfig.router_bias: no HF model type has a softmax router with a correction bias')
    model_type, architecture = 'deepseek_v2', 'DeepseekV2ForCausalLM'
    topk_method = 'group_limited_greedy' if c.n_expert_groups > 1 else 'greedy'
  hf = dict(
      architectures=[architecture],
      model_type=model_type,
      vocab_size=c.vocab_size,
      hidden_size=c.dim,
      intermediate_size=c.inter_dim,
      moe_intermediate_size=c.moe_inter_dim,
      num_hidden_layers=c.n_layers,
      first_k_dense_replace=c.n_dense_layers,
      num_attention_heads=c.n_heads,
      num_key_value_heads=c.n_heads,
      n_routed_experts=c.n_routed_experts,
      n_shared_experts=c.n_shared_experts,
      num_experts_per_tok=c.n_activated_experts,
      n_group=c.n_expert_groups,
      topk_group=c.n_limited_groups,
      scoring_func=c.score_func,
      topk_method=topk_method,
      norm_topk_prob=c.renormalize_topk,
      routed_scaling_factor=c.route_scale,
      q_lora_rank=c.q_lora_rank or None,
      kv_lora_rank=c.kv_lora_rank,
      qk_nope_head_dim=c.qk_nope_head_dim,
      qk_rope_head_dim=c.qk_rope_head_dim,
      v_head_dim=c.v_head_dim,
      max_position_embeddings=c.max_seq_len,
      rms_norm_eps=c.norm_eps,
      rope_theta=c.rope_theta,
      num_nextn_predict_layers=c.n_mtp_layers,
      initializer_range=c.init_std,
      hidden_act='silu',
      attention_bias=False,
      tie_word_embeddings=False,
      rope_interleave=True,
      moe_layer_freq=1,
      torch_dtype=param_dtype,
  )
  if c.yarn and c.rope_factor > 1:
    hf['rope_scaling'] = dict(
        type='yarn', factor=c.rope_factor, original_max_position_embeddings=c.original_seq_len,
        beta_fast=c.beta_fast, beta_slow=c.beta_slow, mscale=c.mscale, mscale_all_dim=c.mscale,
        attention_factor=c.rope_attention_factor)
  return hf
