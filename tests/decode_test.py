"""Cached decoding against the teacher-forced full forward, for both cache forms, and the cache sizes."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

from deepseek_jax import cost, decode
from deepseek_jax.config import PRESETS
from tests.helpers import forward, mtp_forward, random_model

# YaRN on (positions past original_seq_len), q_lora, groups, one dense + two MoE layers, one MTP module;
# decoding attends in blocks of 8 cache positions (the 26-position caches below hold 4 blocks).
CFG = PRESETS['tiny'].replace(max_seq_len=64, original_seq_len=16, rope_factor=4.0, kv_block=8)
PROMPT = 7


def rel_max(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@nnx.jit
def _prefill(model, tokens, cache):
  return decode.prefill(model, tokens, cache)


@nnx.jit
def _decode(model, tokens, positions, cache):
  return decode.decode(model, tokens, positions, cache)


class CacheConsistencyTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = random_model(CFG, seed=3)
    cls.tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, CFG.vocab_size)
    cls.full = forward(cls.model, cls.tokens)

  @parameterized.product(form=('absorbed', 'naive'), layout=('stacked', 'per-layer'))
  def test_prefill_then_decode_equals_full_forward(self, form, layout):
    model, cfg = self.model, CFG
    if layout == 'per-layer':  # the unrolled models' layout: per-layer caches and weights
      cfg = CFG.replace(scan_layers=False)
      model = decode.unstack(random_model(cfg, seed=3))
    cache = decode.init_cache(cfg, 2, 26, form, jnp.float32)
    self.assertEqual(isinstance(cache['moe'], list), layout == 'per-layer')
    logits, hidden, cache = _prefill(model, self.tokens[:, :PROMPT], cache)
    steps, hiddens = [logits], [hidden]
    for t in range(PROMPT, 24):  # one token at a time
      logits, hidden, cache = _decode(model, self.tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
      steps.append(logits)
      hiddens.append(hidden)
    self.assertLessEqual(rel_max(jnp.concatenate(steps, 1), self.full.logits_BTW), 1e-5)
    self.assertLessEqual(rel_max(jnp.concatenate(hiddens, 1), self.full.hidden_BTD), 1e-5)

  def test_multi_token_decode_and_per_row_positions(self):
    # Row 1 is 3 positions behind row 0; both decode 2 tokens per step (the speculative verification shape).
    cache = decode.init_cache(CFG, 2, 26, 'absorbed', jnp.float32)
    _, _, cache = _prefill(self.model, self.tokens[:, :PROMPT], cache)
    lengths = np.array([PROMPT, PROMPT - 3])
    got = {0: [], 1: []}
    for _ in range(4):
      positions = np.stack([lengths, lengths + 1], 1)
      chunk = np.take_along_axis(np.asarray(self.tokens), positions, 1)
      logits, _, cache = _decode(self.model, jnp.asarray(chunk), jnp.asarray(positions), cache)
      for row in (0, 1):
        got[row].append((positions[row], np.asarray(logits[row])))
      lengths = lengths + 2
    for row in (0, 1):
      for positions, logits in got[row]:
        self.assertLessEqual(rel_max(logits, self.full.logits_BTW[row, positions]), 1e-5)

  def test_mtp_cache_equals_teacher_forced_mtp(self):
    want = mtp_forward(self.model, self.tokens).logits_DBTW[0]
    cache = decode.init_cache(CFG, 2, 26, 'absorbed', jnp.float32)
    _, hidden, cache = _prefill(self.model, self.tokens, cache)
    nxt = jnp.pad(self.tokens[:, 1:], ((0, 0), (0, 1)))
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    def step(m, h, t, p, c, method):
      h, c = decode.mtp(m, h, t, p, c, method)
      return m.head(h), c

    step = nnx.jit(step, static_argnums=5)
    prefilled, cache = step(self.model, hidden[:, :PROMPT], nxt[:, :PROMPT], positions[:, :PROMPT], cache, 'prefill')
    rows = [prefilled]
    for t in range(PROMPT, 23):
      logits, cache = step(self.model, hidden[:, t:t + 1], nxt[:, t:t + 1], positions[:, t:t + 1], cache, 'decode')
      rows.append(logits)
    self.assertLessEqual(rel_max(jnp.concatenate(rows, 1), want[:, :23]), 1e-5)

  def test_fp8_latent_cache(self):
    cfg = CFG.replace(kv_lora_rank=128, n_mtp_layers=0)  # a whole 128-wide tile per token
    model = random_model(cfg, seed=5)
    runs = {}
    for fp8 in (False, True):
      cache = decode.init_cache(cfg, 2, 12, 'absorbed', jnp.float32, fp8=fp8)
      _, _, cache = _prefill(model, self.tokens[:, :8], cache)
      runs[fp8] = _decode(model, self.tokens[:, 8:9], jnp.full((2, 1), 8), cache)[0]
      self.assertEqual(cache['moe']['latent'].dtype, jnp.float8_e4m3fn if fp8 else jnp.float32)
    err = float(jnp.linalg.norm(runs[True] - runs[False]) / jnp.linalg.norm(runs[False]))
    self.assertLess(err, 0.05)  # e4m3 latents: ~2% on the logits here
    self.assertGreater(err, 0)


class CacheSizeTest(parameterized.TestCase):

  @parameterized.parameters('tiny', 'demo', 'v2-lite-16b', 'v3-671b')
  def test_bytes_per_token_match_cost_model(self, preset):
    cfg = PRESETS[preset]
    summary = cost.summary(cfg)
    size = lambda form, fp8=False: decode.bytes_per_token(
        jax.eval_shape(lambda: decode.init_cache(cfg, 1, 1, form, jnp.bfloat16, fp8)))
    self.assertEqual(size('absorbed'), summary['kv_bytes_per_token'])
    self.assertEqual(size('naive'), summary['kv_bytes_per_token_naive'])
    cfg = cfg.replace(scan_layers=False)  # one cache per layer: the same bytes
    self.assertEqual(size('absorbed'), summary['kv_bytes_per_token'])
    if preset == 'v3-671b':
      self.assertEqual(size('absorbed'), 70_272)
      self.assertEqual(size('absorbed', fp8=True), 61 * (512 + 4 * 4 + 64 * 2))  # 40,016: 57% of bf16

  def test_length_rounds_up_to_kv_blocks(self):
    cache = decode.init_cache(CFG, 1, 26)  # kv_block 8
    self.assertEqual(cache['moe']['latent'].shape[2], 32)
    self.assertEqual(decode.init_cache(CFG.replace(kv_block=64), 1, 26)['moe']['latent'].shape[2], 26)
    model = random_model(CFG, seed=1)
    odd = jax.tree.map(lambda a: a[:, :, :20], cache)
    with self.assertRaisesRegex(ValueError, 'not a multiple of kv_block 8'):
      _decode(model, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), odd)

  def test_bad_form(self):
    with self.assertRaisesRegex(ValueError, 'cache form'):
      decode.init_cache(CFG, 1, 4, 'paged')
    with self.assertRaisesRegex(ValueError, 'FP8 cache'):
      decode.init_cache(CFG, 1, 4, 'naive', fp8=True)
