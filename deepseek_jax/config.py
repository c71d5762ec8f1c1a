"""Model configuration: DeepSeek-V3's `ModelArgs`, official JSON and HF `config.json` readers, presets.

Field names follow the official `inference/model.py` `ModelArgs` (spec §1.1) so an official JSON config maps
one to one; the fields after `mscale` are what the official code hard-codes or leaves to the HF config
(router bias, top-k renormalisation, MTP depth, dtypes). Every invalid combination raises a ValueError
that names the field at fault.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

_SCORE_FUNCS = ('sigmoid', 'softmax')
_DTYPES = ('float32', 'bfloat16', 'float16')
GMM_IMPLS = ('auto', 'ragged_dot', 'tiled', 'gather')  # see grouped_matmul.gmm
EP_DISPATCHES = ('auto', 'all_gather', 'all_to_all')  # see expert_parallel


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a DeepSeek-V2/V3 model; defaults are the official `ModelArgs` defaults."""

  max_seq_len: int = 4096 * 4
  vocab_size: int = 102400
  dim: int = 2048
  inter_dim: int = 10944
  moe_inter_dim: int = 1408
  n_layers: int = 27
  n_dense_layers: int = 1
  n_heads: int = 16
  # MoE
  n_routed_experts: int = 64
  n_shared_experts: int = 2
  n_activated_experts: int = 6
  n_expert_groups: int = 1
  n_limited_groups: int = 1
  score_func: str = 'softmax'
  route_scale: float = 1.0
  # MLA
  q_lora_rank: int = 0
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  # YaRN: active when max_seq_len > original_seq_len, exactly as the official code decides.
  original_seq_len: int = 4096
  rope_theta: float = 10000.0
  rope_factor: float = 40.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  # Beyond ModelArgs.
  router_bias: bool = False  # aux-loss-free correction bias; official code: `dim == 7168`.
  norm_topk_prob: bool | None = None  # None: renormalise top-k weights iff score_func == 'sigmoid'.
  rope_attention_factor: float = 1.0  # HF YaRN `attention_factor` on cos/sin; 1.0 in every release.
  norm_eps: float = 1e-6
  n_mtp_layers: int = 0  # MTP depth D (1 for V3).
  init_std: float = 0.006  # paper §4.2: every learnable weight ~ N(0, 0.006).
  param_dtype: str = 'float32'
  dtype: str = 'float32'  # activation / matmul dtype.
  gmm_impl: str = 'auto'  # routed-expert grouped matmul, see grouped_matmul.IMPLS.
  remat: bool = False  # recompute each block in the backward pass instead of storing its activations.
  quant: str = 'none'  # 'fp8': the DeepSeek-V3 FP8 recipe on every projection (pallas_kernels.fp8_linear).
  fp8_impl: str = 'auto'  # FP8 kernels: 'auto' (Pallas on TPU, XLA elsewhere), 'pallas', 'interpret', 'xla'.
  fp8_scale_fmt: str = 'f32'  # FP8 scales: 'f32' (V3) or 'ue8m0' (powers of two, V3.1).
  fp8_weights: bool = False  # hold projection / expert weights as FP8 codes + block scales (inference only).
  scan_layers: bool = True  # False unrolls the layer loop: faster small models on CPU, compile time ~ depth.
  kv_block: int = 256  # decoding attends over the KV cache in blocks of this many positions, as far as filled.
  ep_dispatch: str = 'auto'  # expert-parallel dispatch, see expert_parallel.DISPATCHES.

  def __post_init__(self):
    _validate(self)

  # Derived quantities -------------------------------------------------------------------------------

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def renormalize_topk(self) -> bool:
    """Whether top-k gate values are divided by their sum (official: exactly for sigmoid scores)."""
    return self.score_func == 'sigmoid' if self.norm_topk_prob is None else self.norm_topk_prob

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def yarn(self) -> bool:
    return self.max_seq_len > self.original_seq_len

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim^-1/2, times mscale^2 under YaRN (spec §2.3)."""
    scale = self.qk_head_dim**-0.5
    if self.yarn:
      m = yarn_mscale(self.rope_factor, self.mscale)
      scale *= m * m
    return scale

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  # Readers / writers --------------------------------------------------------------------------------

  @classmethod
  def from_official(cls, args: Mapping[str, Any], **overrides) -> 'ModelConfig':
    """Reads an official `inference/configs/config_*.json` dict (ModelArgs keys)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    ignored = {'max_batch_size', 'dtype', 'scale_fmt'}  # serving / weight-storage options, not architecture
    kwargs = {}
    for key, value in args.items():
      if key in ignored:
        continue
      if key not in fields:
        raise ValueError(f'official config: unknown key {key!r}')
      kwargs[key] = value
    # The official Gate creates its bias only for the 671B width (inference/model.py, Gate.__init__).
    kwargs.setdefault('router_bias', kwargs.get('dim', cls.dim) == 7168)
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> 'ModelConfig':
    """Reads a Hugging Face DeepSeek-V2/V3 `config.json` dict."""
    return cls(**{**_hf_to_kwargs(hf), **overrides})

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict for this architecture (classic hub layout)."""
    return _to_hf(self)


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's sqrt(t) = 0.1 * mscale * ln(s) + 1 (spec §2.3); 1 when the factor does not stretch."""
  if factor <= 1:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0


# Validation -----------------------------------------------------------------------------------------


def _validate(c: ModelConfig) -> None:
  def need(ok: bool, field: str, why: str):
    if not ok:
      raise ValueError(f'ModelConfig.{field}: {why} (got {getattr(c, field)!r})')

  for field in ('vocab_size', 'dim', 'n_layers', 'n_heads', 'kv_lora_rank', 'qk_rope_head_dim', 'v_head_dim',
                'max_seq_len', 'original_seq_len'):
    need(getattr(c, field) > 0, field, 'must be positive')
  for field in ('q_lora_rank', 'qk_nope_head_dim', 'n_dense_layers', 'n_shared_experts', 'n_mtp_layers'):
    need(getattr(c, field) >= 0, field, 'must be >= 0')
  need(c.n_dense_layers <= c.n_layers, 'n_dense_layers', f'exceeds n_layers={c.n_layers}')
  need(c.qk_rope_head_dim % 2 == 0, 'qk_rope_head_dim', 'RoPE rotates pairs, so it must be even')
  need(c.rope_theta > 0, 'rope_theta', 'must be positive')
  need(c.rope_factor >= 1, 'rope_factor', 'YaRN factor must be >= 1')
  need(c.norm_eps > 0, 'norm_eps', 'must be positive')
  need(c.param_dtype in _DTYPES, 'param_dtype', f'must be one of {_DTYPES}')
  need(c.dtype in _DTYPES, 'dtype', f'must be one of {_DTYPES}')
  need(c.gmm_impl in GMM_IMPLS, 'gmm_impl', f'must be one of {GMM_IMPLS}')
  need(c.kv_block > 0, 'kv_block', 'must be positive')
  need(c.ep_dispatch in EP_DISPATCHES, 'ep_dispatch', f'must be one of {EP_DISPATCHES}')
  need(c.quant in ('none', 'fp8'), 'quant', "must be 'none' or 'fp8'")
  need(c.fp8_impl in ('auto', 'pallas', 'interpret', 'xla'), 'fp8_impl', "must be 'auto', 'pallas', 'interpret' or 'xla'")
  need(c.fp8_scale_fmt in ('f32', 'ue8m0'), 'fp8_scale_fmt', "must be 'f32' or 'ue8m0'")
  if c.n_dense_layers > 0:
    need(c.inter_dim > 0, 'inter_dim', 'dense layers need a positive FFN width')
  if c.n_moe_layers == 0 and c.n_mtp_layers == 0:
    return  # no MoE layer exists, so the routing fields are unused
  need(c.moe_inter_dim > 0, 'moe_inter_dim', 'must be positive')
  need(c.score_func in _SCORE_FUNCS, 'score_func', f'must be one of {_SCORE_FUNCS}')
  need(c.n_routed_experts > 0, 'n_routed_experts', 'must be positive')
  need(0 < c.n_activated_experts <= c.n_routed_experts, 'n_activated_experts',
       f'top-k must lie in [1, n_routed_experts={c.n_routed_experts}]')
  need(c.n_expert_groups > 0, 'n_expert_groups', 'must be positive')
  need(c.n_routed_experts % c.n_expert_groups == 0, 'n_routed_experts',
       f'must be divisible by n_expert_groups={c.n_expert_groups}')
  need(0 < c.n_limited_groups <= c.n_expert_groups, 'n_limited_groups',
       f'must lie in [1, n_expert_groups={c.n_expert_groups}]')
  per_group = c.n_routed_experts // c.n_expert_groups
  need(c.n_activated_experts <= c.n_limited_groups * per_group, 'n_activated_experts',
       f'top-k exceeds the {c.n_limited_groups * per_group} experts in the n_limited_groups kept groups')
  if c.score_func == 'sigmoid' and c.n_expert_groups > 1:
    need(per_group >= 2, 'n_expert_groups', 'sigmoid group scores sum the top-2 experts of a group: '
         'each group needs >= 2 experts')
  need(c.route_scale > 0, 'route_scale', 'must be positive')


# Hugging Face config.json ---------------------------------------------------------------------------


def _hf_to_kwargs(hf: Mapping[str, Any]) -> dict[str, Any]:
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


def _to_hf(c: ModelConfig) -> dict[str, Any]:
  if c.score_func == 'sigmoid':
    model_type, architecture = 'deepseek_v3', 'DeepseekV3ForCausalLM'
    topk_method = 'noaux_tc' if c.router_bias else 'greedy'
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
      torch_dtype=c.param_dtype,
  )
  if c.yarn and c.rope_factor > 1:
    hf['rope_scaling'] = dict(
        type='yarn', factor=c.rope_factor, original_max_position_embeddings=c.original_seq_len,
        beta_fast=c.beta_fast, beta_slow=c.beta_slow, mscale=c.mscale, mscale_all_dim=c.mscale,
        attention_factor=c.rope_attention_factor)
  return hf


# Presets --------------------------------------------------------------------------------------------

# inference/configs/config_671B.json (spec §1.1), with the HF context length and V3's single MTP module.
_V3_671B = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
                n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                n_limited_groups=4, route_scale=2.5, score_func='sigmoid', q_lora_rank=1536, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dtype='fp8')
# inference/configs/config_16B.json (spec §1.3): DeepSeek-V2-Lite shape.
_V2_LITE_16B = dict(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1,
                    n_heads=16, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, route_scale=1.0,
                    q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    mscale=0.707)

# Small V3-style models: sigmoid routing with groups, correction bias, one MTP module, plain RoPE
# (pre-training runs without YaRN, spec §2.3).
_SMALL_V3 = dict(score_func='sigmoid', router_bias=True, n_mtp_layers=1, original_seq_len=4096, route_scale=2.5)

PRESETS: dict[str, ModelConfig] = {
    'tiny': ModelConfig(
        vocab_size=256, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
        n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_seq_len=128, **_SMALL_V3),
    'demo': ModelConfig(
        vocab_size=4096, dim=256, inter_dim=768, moe_inter_dim=128, n_layers=4, n_dense_layers=1, n_heads=4,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_seq_len=512, **_SMALL_V3),
    'v2-lite-16b': ModelConfig.from_official(_V2_LITE_16B, param_dtype='bfloat16', dtype='bfloat16'),
    'v3-671b': ModelConfig.from_official(_V3_671B, max_seq_len=163840, n_mtp_layers=1, param_dtype='bfloat16',
                                         dtype='bfloat16'),
}
