"""MLA against the official naive path (concatenated per-head keys, float64 numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.mla import MLA
from deepseek_jax.rope import inv_freq

BASE = PRESETS['tiny'].replace(max_seq_len=512, original_seq_len=16, rope_factor=4.0)  # YaRN on


def rms(x, w, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, cfg):
  xc = x.reshape(*x.shape[:-1], -1, 2)
  xc = xc[..., 0] + 1j * xc[..., 1]
  angles = pos[:, :, None].astype(np.float32) * inv_freq(cfg)
  rot = np.exp(1j * angles.astype(np.float64))
  if x.ndim == 4:
    rot = rot[:, :, None]
  out = xc * rot * (cfg.rope_attention_factor if cfg.yarn else 1.0)
  return np.stack([out.real, out.imag], -1).reshape(x.shape)


def official_naive(mla, x, pos, cfg):
  p = {'/'.join(k): np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(mla))}
  b, t, _ = x.shape
  h, n, r, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  if cfg.q_lora_rank:
    q = rms(x @ p['wq_a/kernel'], p['q_norm/scale'], cfg.norm_eps) @ p['wq_b/kernel']
  else:
    q = x @ p['wq/kernel']
  q = q.reshape(b, t, h, n + r)
  q = np.concatenate([q[..., :n], rope(q[..., n:], pos, cfg)], -1)
  kv = x @ p['wkv_a/kernel']
  c, k_pe = kv[..., :cfg.kv_lora_rank], rope(kv[..., cfg.kv_lora_rank:], pos, cfg)
  kv = (rms(c, p['kv_norm/scale'], cfg.norm_eps) @ p['wkv_b/kernel']).reshape(b, t, h, n + v)
  k = np.concatenate([kv[..., :n], np.broadcast_to(k_pe[:, :, None], (b, t, h, r))], -1)
  scores = np.einsum('bshd,bthd->bsht', q, k) * cfg.softmax_scale
  scores = scores + np.triu(np.full((t, t), -np.inf), 1)[:, None, :]
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bsht,bthd->bshd', probs, kv[..., n:])
  return out.reshape(b, t, h * v) @ p['wo/kernel']


class MLATest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('q_lora_yarn', BASE), ('no_q_lora_yarn', BASE.replace(q_lora_rank=0)),
      ('q_lora_plain_rope', BASE.replace(max_seq_len=16)),
      ('attention_factor', BASE.replace(rope_attention_factor=1.2, mscale=0.7)))
  def test_matches_official_naive(self, cfg):
    mla = MLA(cfg.replace(init_std=0.3), Runtime(), nnx.Rngs(0))
    x = np.array(jax.random.normal(jax.random.key(1), (2, 24, cfg.dim)))
    x[1, 3] *= 20.0
    pos = np.broadcast_to(np.arange(24), (2, 24))
    got, _ = nnx.jit(lambda m, x, p: m(x, p))(mla, jnp.asarray(x), jnp.asarray(pos))
    want = official_naive(mla, x.astype(np.float64), pos, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

  def test_wq_only_without_q_lora(self):
    names = {'/'.join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(MLA(BASE.replace(q_lora_rank=0),
                                                                                  Runtime(), nnx.Rngs(0))))}
    self.assertIn('wq/kernel', names)
    self.assertFalse({'wq_a/kernel', 'q_norm/scale', 'wq_b/kernel'} & names)
