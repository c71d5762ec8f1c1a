"""Cached decoding against the teacher-forced full forward, for every cache form, and the cache sizes."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

from deepseek_jax import cost
from deepseek_jax.cache import CacheForm, bytes_per_token
from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.model import DeepSeekV3
from tests.helpers import forward, mtp_forward, next_tokens, random_model

# YaRN on (positions past original_seq_len), q_lora, groups, one dense + two MoE layers, one MTP module;
# decoding attends in blocks of 8 cache positions (the 26-position caches below hold 4 blocks).
CFG = PRESETS['tiny'].replace(max_seq_len=64, original_seq_len=16, rope_factor=4.0)
RT = Runtime(kv_block=8)
PROMPT = 7


def rel_max(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@nnx.jit
def _run(model, tokens, positions, cache):
  """The trunk with a cache: (logits, hidden, cache). positions None: a prompt from position 0 (prefill)."""
  out = model.forward(tokens, positions, cache)
  return out.logits_BTW, out.hidden_BTD, out.cache


class CacheConsistencyTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = random_model(CFG, seed=3, rt=RT)
    cls.tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, CFG.vocab_size)
    cls.full = forward(cls.model, cls.tokens)

  @parameterized.product(form=(CacheForm.ABSORBED, CacheForm.NAIVE), layout=('stacked', 'per-layer'))
  def test_prefill_then_decode_equals_full_forward(self, form, layout):
    model = self.model
    if layout == 'per-layer':  # the unrolled models' layout: per-layer caches and weights
      model = random_model(CFG, seed=3, rt=RT.replace(scan_layers=False)).unstacked()
    cache = model.init_cache(2, 26, form, jnp.float32)
    self.assertEqual(isinstance(cache.moe, list), layout == 'per-layer')
    logits, hidden, cache = _run(model, self.tokens[:, :PROMPT], None, cache)
    steps, hiddens = [logits], [hidden]
    for t in range(PROMPT, 24):  # one token at a time
      logits, hidden, cache = _run(model, self.tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
      steps.append(logits)
      hiddens.append(hidden)
    self.assertLessEqual(rel_max(jnp.concatenate(steps, 1), self.full.logits_BTW), 1e-5)
    self.assertLessEqual(rel_max(jnp.concatenate(hiddens, 1), self.full.hidden_BTD), 1e-5)

  def test_multi_token_decode_and_per_row_positions(self):
    # Row 1 is 3 positions behind row 0; both decode 2 tokens per step (the speculative verification shape).
    cache = self.model.init_cache(2, 26, CacheForm.ABSORBED, jnp.float32)
    _, _, cache = _run(self.model, self.tokens[:, :PROMPT], None, cache)
    lengths = np.array([PROMPT, PROMPT - 3])
    got = {0: [], 1: []}
    for _ in range(4):
      positions = np.stack([lengths, lengths + 1], 1)
      chunk = np.take_along_axis(np.asarray(self.tokens), positions, 1)
      logits, _, cache = _run(self.model, jnp.asarray(chunk), jnp.asarray(positions), cache)
      for row in (0, 1):
        got[row].append((positions[row], np.asarray(logits[row])))
      lengths = lengths + 2
    for row in (0, 1):
      for positions, logits in got[row]:
        self.assertLessEqual(rel_max(logits, self.full.logits_BTW[row, positions]), 1e-5)

  def test_mtp_cache_equals_teacher_forced_mtp(self):
    want = mtp_forward(self.model, self.tokens).logits_PBTW[0]
    cache = self.model.init_cache(2, 26, CacheForm.ABSORBED, jnp.float32)
    _, hidden, cache = _run(self.model, self.tokens, None, cache)
    nxt = next_tokens(self.tokens)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))

    @nnx.jit
    def step(m, h, t, p, c):
      out = m.mtp_forward(t, h, p, c)
      return out.logits_PBTW[0], out.cache

    prefilled, cache = step(self.model, hidden[:, :PROMPT], nxt[:, :PROMPT], positions[:, :PROMPT], cache)
    rows = [prefilled]
    for t in range(PROMPT, 23):
      logits, cache = step(self.model, hidden[:, t:t + 1], nxt[:, t:t + 1], positions[:, t:t + 1], cache)
      rows.append(logits)
    self.assertLessEqual(rel_max(jnp.concatenate(rows, 1), want[:, :23]), 1e-5)

  def test_fp8_latent_cache(self):
    cfg = CFG.replace(kv_lora_rank=128, n_mtp_layers=0)  # a whole 128-wide tile per token
    model = random_model(cfg, seed=5, rt=RT)
    runs = {}
    for form in (CacheForm.ABSORBED, CacheForm.FP8):
      cache = model.init_cache(2, 12, form, jnp.float32)
      _, _, cache = _run(model, self.tokens[:, :8], None, cache)
      runs[form] = _run(model, self.tokens[:, 8:9], jnp.full((2, 1), 8), cache)[0]
      self.assertEqual(cache.moe.latent.dtype, jnp.float8_e4m3fn if form is CacheForm.FP8 else jnp.float32)
    fp8, bf = runs[CacheForm.FP8], runs[CacheForm.ABSORBED]
    err = float(jnp.linalg.norm(fp8 - bf) / jnp.linalg.norm(bf))
    self.assertLess(err, 0.05)  # e4m3 latents: ~2% on the logits here
    self.assertGreater(err, 0)


class CacheSizeTest(parameterized.TestCase):

  @parameterized.parameters('tiny', 'demo', 'v2-lite-16b', 'v3-671b')
  def test_bytes_per_token_match_cost_model(self, preset):
    cfg = PRESETS[preset]
    summary = cost.summary(cfg)
    stacked = nnx.eval_shape(lambda: DeepSeekV3(cfg, Runtime(), nnx.Rngs(0)))
    per_layer = nnx.eval_shape(lambda: DeepSeekV3(cfg, Runtime(), nnx.Rngs(0)).unstacked())
    size = lambda model, form: bytes_per_token(jax.eval_shape(lambda: model.init_cache(1, 1, form, jnp.bfloat16)))
    self.assertEqual(size(stacked, CacheForm.ABSORBED), summary['kv_bytes_per_token'])
    self.assertEqual(size(stacked, CacheForm.NAIVE), summary['kv_bytes_per_token_naive'])
    self.assertEqual(size(per_layer, CacheForm.ABSORBED), summary['kv_bytes_per_token'])  # one cache per layer
    if preset == 'v3-671b':
      self.assertEqual(size(stacked, CacheForm.ABSORBED), 70_272)
      self.assertEqual(size(stacked, CacheForm.FP8), 61 * (512 + 4 * 4 + 64 * 2))  # 40,016: 57% of bf16

  def test_length_rounds_up_to_kv_blocks(self):
    model = random_model(CFG, seed=1, rt=RT)
    cache = model.init_cache(1, 26)  # kv_block 8
    self.assertEqual(cache.moe.latent.shape[2], 32)
    self.assertEqual(random_model(CFG, rt=Runtime(kv_block=64)).init_cache(1, 26).moe.latent.shape[2], 26)
    odd = jax.tree.map(lambda a: a[:, :, :20], cache)
    with self.assertRaisesRegex(ValueError, 'not a multiple of kv_block 8'):
      _run(model, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), odd)

  def test_bad_form(self):
    with self.assertRaisesRegex(ValueError, 'cache form'):
      random_model(CFG).init_cache(1, 4, 'paged')
    with self.assertRaisesRegex(ValueError, 'paged'):
      CacheForm('paged')
