"""What a model is and how to run it: `ModelConfig` (the architecture a checkpoint needs), `Runtime` (dtypes,
kernels, memory and compile-time trade-offs, none of which a checkpoint records), the official JSON reader
and the presets.

ModelConfig's field names follow the official `inference/model.py` `ModelArgs` (DeepSeek-V3 repository) so an
official JSON config maps one to one; the fields after `mscale` are what the official code hard-codes or
leaves to the HF config (router bias, top-k renormalisation, MTP depth, initialisation). The HF `config.json`
reader and writer live in `hf_config.py`, next to the checkpoint code. Every invalid combination raises a
ValueError that names the field at fault.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

from deepseek_jax import quant4
from deepseek_jax.attention import IMPLS as ATTENTION_IMPLS
from deepseek_jax.cpu_kernels import LINEAR_IMPLS
from deepseek_jax.expert_parallel import DISPATCHES
from deepseek_jax.grouped_matmul import IMPLS as GMM_IMPLS
from pallas_kernels.common import IMPLS as KERNEL_IMPLS, SCALE_FORMATS

_SCORE_FUNCS = ('sigmoid', 'softmax')
_DTYPES = ('float32', 'bfloat16', 'float16')


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
    """qk_head_dim^-1/2, times mscale^2 under YaRN (official `MLA.__init__`)."""
    scale = self.qk_head_dim**-0.5
    if self.yarn:
      m = yarn_mscale(self.rope_factor, self.mscale)
      scale *= m * m
    return scale

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

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


@dataclasses.dataclass(frozen=True)
class Runtime:
  """How to run a model: dtypes, kernels, memory and compile-time trade-offs. A checkpoint does not record
  any of these; the same weights train, decode and load under any Runtime."""

  param_dtype: str = 'float32'  # storage of the weights (training: the fp32 master weights)
  dtype: str = 'float32'  # activations and matmul inputs
  quant: str = 'none'  # 'fp8': the DeepSeek-V3 FP8 recipe on every projection (pallas_kernels.fp8_linear)
  fp8_impl: str = 'auto'  # FP8 kernels, see pallas_kernels.common.resolve_impl
  fp8_scale_fmt: str = 'f32'  # FP8 scales: 'f32' (V3) or 'ue8m0' (powers of two, V3.1)
  fp8_weights: bool = False  # hold projection / expert weights as FP8 codes + block scales (inference only)
  # 'int4' | 'mxfp4': hold the routed experts as packed 4-bit codes + group scales (quant4.py; inference
  # only), whatever fp8_weights says for the other projections.
  weights4: str = 'none'
  weights4_group: int = 0  # input rows per scale: 0 the format's default (int4 128, mxfp4 32)
  weights4_impl: str = 'auto'  # 4-bit expert matmuls at decode sizes, see pallas_kernels.quant4_gemm
  gmm_impl: str = 'auto'  # routed-expert grouped matmul, see grouped_matmul.resolve
  linear_impl: str = 'auto'  # projections: XLA, or the native CPU kernel at decode sizes (cpu_kernels.py)
  ep_dispatch: str = 'auto'  # expert-parallel dispatch, see expert_parallel.resolve
  remat: bool = False  # recompute each block in the backward pass instead of storing its activations
  scan_layers: bool = True  # False unrolls the layer loop: faster small models on CPU, compile time ~ depth
  kv_block: int = 256  # decoding attends over the KV cache in blocks of this many positions, as far as filled
  attention: str = 'auto'  # uncached causal attention: 'dense' | 'flash' | 'splash' (TPU), see attention.py
  attention_block: int = 512  # flash / splash query and key block rows: temporaries [B, H, block, block]
  head_chunk: int = 1024  # the training loss runs the output head this many tokens at a time (loss.py)

  def __post_init__(self):
    def need(ok: bool, field: str, why: str):
      if not ok:
        raise ValueError(f'Runtime.{field}: {why} (got {getattr(self, field)!r})')

    need(self.param_dtype in _DTYPES, 'param_dtype', f'must be one of {_DTYPES}')
    need(self.dtype in _DTYPES, 'dtype', f'must be one of {_DTYPES}')
    need(self.quant in ('none', 'fp8'), 'quant', "must be 'none' or 'fp8'")
    need(self.fp8_impl in KERNEL_IMPLS, 'fp8_impl', f'must be one of {KERNEL_IMPLS}')
    need(self.fp8_scale_fmt in SCALE_FORMATS, 'fp8_scale_fmt', f'must be one of {SCALE_FORMATS}')
    need(self.weights4 in ('none',) + quant4.FORMATS, 'weights4', f"must be 'none' or one of {quant4.FORMATS}")
    if self.weights4 != 'none' and self.weights4_group:
      groups = quant4.INT4_GROUPS if self.weights4 == 'int4' else (quant4.MX_GROUP,)
      need(self.weights4_group in groups, 'weights4_group', f'{self.weights4} groups are one of {groups} (0: default)')
    need(self.weights4_impl in KERNEL_IMPLS, 'weights4_impl', f'must be one of {KERNEL_IMPLS}')
    need(self.gmm_impl in GMM_IMPLS, 'gmm_impl', f'must be one of {GMM_IMPLS}')
    need(self.linear_impl in LINEAR_IMPLS, 'linear_impl', f'must be one of {LINEAR_IMPLS}')
    need(self.ep_dispatch in DISPATCHES, 'ep_dispatch', f'must be one of {DISPATCHES}')
    need(self.kv_block > 0, 'kv_block', 'must be positive')
    need(self.attention in ATTENTION_IMPLS, 'attention', f'must be one of {ATTENTION_IMPLS}')
    need(self.attention_block > 0, 'attention_block', 'must be positive')
    need(self.head_chunk > 0, 'head_chunk', 'must be positive')

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> 'Runtime':
    return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's sqrt(t) = 0.1 * mscale * ln(s) + 1 (official `yarn_get_mscale`); 1 when the factor does not
  stretch."""
  if factor <= 1:
    return 1.0
  return 0.1 * mscale * math.log(factor) + 1.0


# Validation -----------------------------------------------------------------------------------------


def _validate(c: ModelConfig) -> None:
  def need(ok: bool, field: str, why: str):
    if not ok:
      raise ValueError(f'ModelConfig.{field}: {why} (got {getattr(c, field)!r})')

  for f in dataclasses.fields(c):  # types first: a size read as '7168' or 7168.0 fails here, named
    value, kind = getattr(c, f.name), type(f.default)
    if f.default is None:  # norm_topk_prob: a bool or None
      need(value is None or isinstance(value, bool), f.name, 'must be true, false or null')
    elif kind is float:
      need(isinstance(value, (int, float)) and not isinstance(value, bool), f.name, 'must be a number')
    else:
      need(type(value) is kind, f.name, f'must be {"an" if kind is int else "a"} {kind.__name__}')
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
  if c.router_bias and c.n_expert_groups > 1:
    need(per_group >= 2, 'n_expert_groups', 'with a correction bias a group scores as the sum of its top-2 '
         'experts: each group needs >= 2 experts')
  need(c.route_scale > 0, 'route_scale', 'must be positive')


# Presets --------------------------------------------------------------------------------------------

# inference/configs/config_671B.json, with the HF context length and V3's single MTP module.
_V3_671B = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
                n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                n_limited_groups=4, route_scale=2.5, score_func='sigmoid', q_lora_rank=1536, kv_lora_rank=512,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, dtype='fp8')
# inference/configs/config_16B.json: DeepSeek-V2-Lite shape.
_V2_LITE_16B = dict(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1,
                    n_heads=16, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, route_scale=1.0,
                    q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    mscale=0.707)

# Small V3-style models: sigmoid routing with groups, correction bias, one MTP module, plain RoPE
# (pre-training runs at 4K without YaRN, paper §4.3).
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
    'v2-lite-16b': ModelConfig.from_official(_V2_LITE_16B),
    'v3-671b': ModelConfig.from_official(_V3_671B, max_seq_len=163840, n_mtp_layers=1),
}

# How the released models are served: bf16 weights and activations.
BF16 = Runtime(param_dtype='bfloat16', dtype='bfloat16')
