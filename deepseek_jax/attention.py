"""Causal self-attention over MLA's per-head keys (training and uncached forwards): scores
q_nope . k_nope + q_pe . k_pe with one rotary key k_pe shared by every head (paper §2.1.1, Eq. 10), softmax in
float32, values of their own width (V = 128 where the query/key width is N + R = 192 in V3).

Three forms, one result:
- 'dense': the [B, H, T, T] scores materialised (the reference; what a short sequence needs).
- 'flash': blockwise with an online softmax (FlashAttention, Dao et al. 2022; the backward of FlashAttention-2,
  Dao 2023): queries in blocks of `block` rows, each attending to the key blocks at or before its own (causal
  blocks above the diagonal are never computed), keeping only a running max, sum and output; a custom VJP
  saves the output and each row's log-sum-exp and recomputes every block's scores in the backward pass, so
  the step holds [B, H, block, block] scores at a time and its memory grows linearly with T. XLA on every
  backend.
- 'splash': the TPU Pallas kernel `jax.experimental.pallas.ops.tpu.splash_attention` (forward and backward),
  fed per-head keys [k_nope; k_pe] of width N + R, as MaxText feeds it for MLA.
'auto' is splash on TPU; elsewhere flash once T exceeds one block, dense below.

Letters beyond model.py's key: S key positions, N / R the non-rotary / rotary query-key widths, V the value
width, Q blocks of queries, L rows of one block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from deepseek_jax import sharding

IMPLS = ('auto', 'dense', 'flash', 'splash')
F32 = jnp.float32


def resolve(impl: str, t: int, block: int) -> str:
  if impl not in IMPLS:
    raise ValueError(f'attention must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'splash' if jax.default_backend() == 'tpu' else ('flash' if t > block else 'dense')
  return impl


def causal(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale: float, impl: str = 'auto',
           block: int = 512):
  """softmax(scale * (q_nope.k_nope + q_pe.k_pe) + causal mask) @ v, T == S, out [B, T, H, V] in q's dtype."""
  impl = resolve(impl, q_nope_BTHN.shape[1], block)
  if impl == 'dense':
    return dense(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale)
  if impl == 'splash':
    return splash(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale)
  t = q_nope_BTHN.shape[1]
  block = min(block, t)
  pad = -t % block  # padded keys sit after every real query, so the causal mask already hides them
  if pad:
    q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV = (
        jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        for a in (q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV))
  return flash(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale, block)[:, :t]


def dense(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale):
  scores_BHTS = (jnp.einsum('bthn,bshn->bhts', q_nope_BTHN, k_nope_BSHN, preferred_element_type=F32) +
                 jnp.einsum('bthr,bsr->bhts', q_pe_BTHR, k_pe_BSR, preferred_element_type=F32)) * scale
  t, s = scores_BHTS.shape[-2:]
  causal_TS = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
  scores_BHTS = jnp.where(causal_TS, scores_BHTS, -jnp.inf)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BSHV.dtype)
  return jnp.einsum('bhts,bshv->bthv', probs_BHTS, v_BSHV)


# Flash ----------------------------------------------------------------------------------------------------


def _rows(a, i, block):
  return jax.lax.dynamic_slice_in_dim(a, i * block, block, axis=1)


def _scores(q_nope_BLHN, q_pe_BLHR, k_nope_BLHN, k_pe_BLR, i, j, scale, block):
  """Masked fp32 scores [B, H, L, L] of query block i against key block j."""
  scores_BHLL = (jnp.einsum('bthn,bshn->bhts', q_nope_BLHN, k_nope_BLHN, preferred_element_type=F32) +
                 jnp.einsum('bthr,bsr->bhts', q_pe_BLHR, k_pe_BLR, preferred_element_type=F32)) * scale
  visible_LL = i * block + jnp.arange(block)[:, None] >= j * block + jnp.arange(block)[None, :]
  return jnp.where(visible_LL, scores_BHLL, -jnp.inf)


def _forward(q_nope, q_pe, k_nope, k_pe, v, scale, block):
  """(out [B, T, H, V], log-sum-exp of each row's scores [B, H, T])."""
  b, t, h, _ = q_nope.shape

  def query_block(i):
    qn, qp = _rows(q_nope, i, block), _rows(q_pe, i, block)

    def step(j, carry):
      max_BHL, sum_BHL, out_BLHV = carry
      scores_BHLL = _scores(qn, qp, _rows(k_nope, j, block), _rows(k_pe, j, block), i, j, scale, block)
      new_max_BHL = jnp.maximum(max_BHL, scores_BHLL.max(-1))
      probs_BHLL = jnp.exp(scores_BHLL - new_max_BHL[..., None])
      rescale_BHL = jnp.exp(max_BHL - new_max_BHL)
      out_BLHV = out_BLHV * rescale_BHL.transpose(0, 2, 1)[..., None] + jnp.einsum(
          'bhts,bshv->bthv', probs_BHLL.astype(v.dtype), _rows(v, j, block), preferred_element_type=F32)
      return new_max_BHL, sum_BHL * rescale_BHL + probs_BHLL.sum(-1), out_BLHV

    # Every query sees key 0, so after block 0 the running max is finite (and exp(-inf) clears the init).
    init = (jnp.full((b, h, block), -jnp.inf, F32), jnp.zeros((b, h, block), F32),
            jnp.zeros((b, block, h, v.shape[-1]), F32))
    max_BHL, sum_BHL, out_BLHV = jax.lax.fori_loop(0, i + 1, step, init)
    return out_BLHV / sum_BHL.transpose(0, 2, 1)[..., None], max_BHL + jnp.log(sum_BHL)

  out_QBLHV, lse_QBHL = jax.lax.map(query_block, jnp.arange(t // block))
  out_BTHV = jnp.moveaxis(out_QBLHV, 0, 1).reshape(b, t, h, -1)
  return out_BTHV.astype(q_nope.dtype), jnp.moveaxis(lse_QBHL, 0, 2).reshape(b, h, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def flash(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale: float, block: int):
  """Blockwise causal attention; T must be a multiple of `block` (`causal` pads)."""
  return _forward(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale, block)[0]


def _flash_fwd(q_nope, q_pe, k_nope, k_pe, v, scale, block):
  out, lse = _forward(q_nope, q_pe, k_nope, k_pe, v, scale, block)
  return out, (q_nope, q_pe, k_nope, k_pe, v, out, lse)


def _flash_bwd(scale, block, residuals, d_out_BTHV):
  """FlashAttention-2's backward: per key block j, the query blocks at or after it recompute their
  probabilities from the saved log-sum-exp; dK, dV accumulate in the key block, dQ in a full fp32 carry."""
  q_nope, q_pe, k_nope, k_pe, v, out, lse_BHT = residuals
  n_blocks = q_nope.shape[1] // block
  # D_i = dO_i . O_i: the softmax backward's row term, sum_s P_ts dP_ts.
  delta_BHT = jnp.einsum('bthv,bthv->bht', d_out_BTHV.astype(F32), out.astype(F32))

  def key_block(carry, j):
    dq_nope_BTHN, dq_pe_BTHR = carry
    kn, kp, vj = _rows(k_nope, j, block), _rows(k_pe, j, block), _rows(v, j, block)

    def step(i, inner):
      dq_nope_BTHN, dq_pe_BTHR, dk_nope_BLHN, dk_pe_BLR, dv_BLHV = inner
      qn, qp, d_out = _rows(q_nope, i, block), _rows(q_pe, i, block), _rows(d_out_BTHV, i, block)
      lse_BHL = jax.lax.dynamic_slice_in_dim(lse_BHT, i * block, block, axis=2)
      delta_BHL = jax.lax.dynamic_slice_in_dim(delta_BHT, i * block, block, axis=2)
      probs_BHLL = jnp.exp(_scores(qn, qp, kn, kp, i, j, scale, block) - lse_BHL[..., None])
      dv_BLHV = dv_BLHV + jnp.einsum('bhts,bthv->bshv', probs_BHLL.astype(d_out.dtype), d_out,
                                     preferred_element_type=F32)
      d_probs_BHLL = jnp.einsum('bthv,bshv->bhts', d_out, vj, preferred_element_type=F32)
      d_scores_BHLL = probs_BHLL * (d_probs_BHLL - delta_BHL[..., None]) * scale
      ds = d_scores_BHLL.astype(q_nope.dtype)
      dk_nope_BLHN = dk_nope_BLHN + jnp.einsum('bhts,bthn->bshn', ds, qn, preferred_element_type=F32)
      dk_pe_BLR = dk_pe_BLR + jnp.einsum('bhts,bthr->bsr', ds, qp, preferred_element_type=F32)
      add = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, _rows(full, i, block) + part, i * block, 1)
      dq_nope_BTHN = add(dq_nope_BTHN, jnp.einsum('bhts,bshn->bthn', ds, kn, preferred_element_type=F32))
      dq_pe_BTHR = add(dq_pe_BTHR, jnp.einsum('bhts,bsr->bthr', ds, kp, preferred_element_type=F32))
      return dq_nope_BTHN, dq_pe_BTHR, dk_nope_BLHN, dk_pe_BLR, dv_BLHV

    init = (dq_nope_BTHN, dq_pe_BTHR, jnp.zeros(kn.shape, F32), jnp.zeros(kp.shape, F32), jnp.zeros(vj.shape, F32))
    dq_nope_BTHN, dq_pe_BTHR, dk_nope, dk_pe, dv = jax.lax.fori_loop(j, n_blocks, step, init)
    return (dq_nope_BTHN, dq_pe_BTHR), (dk_nope, dk_pe, dv)

  init = (jnp.zeros(q_nope.shape, F32), jnp.zeros(q_pe.shape, F32))
  (dq_nope, dq_pe), (dk_nope_Q, dk_pe_Q, dv_Q) = jax.lax.scan(key_block, init, jnp.arange(n_blocks))
  joined = lambda blocks_Q, like: jnp.moveaxis(blocks_Q, 0, 1).reshape(like.shape).astype(like.dtype)
  return (dq_nope.astype(q_nope.dtype), dq_pe.astype(q_pe.dtype), joined(dk_nope_Q, k_nope), joined(dk_pe_Q, k_pe),
          joined(dv_Q, v))


flash.defvjp(_flash_fwd, _flash_bwd)


# Splash (TPU) ---------------------------------------------------------------------------------------------


def splash(q_nope_BTHN, q_pe_BTHR, k_nope_BSHN, k_pe_BSR, v_BSHV, scale, *, interpret: bool = False,
           block: int = 512):
  """The TPU splash kernel on per-head [q_nope; q_pe] (pre-scaled) and [k_nope; k_pe broadcast] of width
  N + R; forward and backward are the kernel's own."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, t, h, _ = q_nope_BTHN.shape
  q_BHTJ = (jnp.concatenate([q_nope_BTHN, q_pe_BTHR], -1) * scale).astype(q_nope_BTHN.dtype).transpose(0, 2, 1, 3)
  k_pe_BSHR = jnp.broadcast_to(k_pe_BSR[:, :, None], k_nope_BSHN.shape[:3] + k_pe_BSR.shape[-1:])
  k_BHSJ = jnp.concatenate([k_nope_BSHN, k_pe_BSHR.astype(k_nope_BSHN.dtype)], -1).transpose(0, 2, 1, 3)
  v_BHSV = v_BSHV.transpose(0, 2, 1, 3)
  size = min(block, t)
  sizes = sa.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size, block_kv_dkv=size,
                        block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)
  mask = sa.MultiHeadMask([sa.CausalMask((t, t))] * h)
  kernel = jax.vmap(sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                       interpret=interpret))
  # A Pallas call is not partitioned by XLA: on a mesh each device runs it on its own sequences.
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else tuple(a for a in sharding.RULES['batch']
                                     if a in mesh.axis_names and a not in mesh.manual_axes and mesh.shape[a] > 1)
  if axes and b % math.prod(mesh.shape[a] for a in axes) == 0:
    spec = jax.sharding.PartitionSpec(axes)
    kernel = jax.shard_map(kernel, mesh=mesh, in_specs=spec, out_specs=spec, axis_names=set(axes), check_vma=False)
  return kernel(q_BHTJ, k_BHSJ, v_BHSV).transpose(0, 2, 1, 3)
