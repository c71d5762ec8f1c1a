"""Generation: greedy equals the full-forward rollout, rows are independent, speculative decoding is lossless,
4-bit experts decode as their dequantized weights do and keep a trained model's cross-entropy, our greedy
tokens equal transformers' generate(), sampling filters, and clear errors."""

import functools
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from deepseek_jax import cache as kv
from deepseek_jax import expert_parallel, held, sharding
from deepseek_jax import generate as generate_lib
from deepseek_jax.cache import CacheForm
from deepseek_jax.config import BF16, PRESETS, Runtime
from deepseek_jax.generate import generate
from deepseek_jax.loss import cross_entropy
from deepseek_jax.optimizer import adamw
from deepseek_jax.sampling import SamplingParams, accept_draft, filtered_logits, greedy_rollout, sample
from deepseek_jax.train_step import Hyper, init_train_state, train_step
from deepseek_jax.trainer import restore_model
from tests.experts4_test import dequantized_copy
from tests.helpers import forward, random_hf_model, random_model, require

TINY = PRESETS['tiny']
PROMPTS = [[5, 9, 33, 7, 120], [100, 2], [7, 7, 7, 7, 7, 8, 250]]


@functools.cache
def trained_tiny(steps=60):
  """A tiny model trained on a repeating pattern: its MTP module learns to draft (acceptance >> 0)."""
  model = random_model(TINY, seed=1)
  tx = adamw()
  graphdef, state = init_train_state(model, tx)
  step = jax.jit(functools.partial(train_step, graphdef, tx))
  pattern = jnp.tile(jnp.arange(3, 3 + 11), 8)[:65]
  batch = jnp.stack([jnp.roll(pattern, -i) for i in range(4)])[None]
  hyper = Hyper(*(jnp.float32(v) for v in (3e-3, 1e-3, 0.3, 1e-4)))
  for _ in range(steps):
    state, _ = step(state, batch, hyper)
  return nnx.merge(graphdef, state.params, state.bias)


@functools.cache
def random_tiny():
  """A random tiny model and its one-device greedy decoding of PROMPTS (10 new tokens)."""
  model = random_model(TINY, seed=3)
  return model, generate(model, PROMPTS, 10)


class GenerateTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.greedy = random_tiny()

  def test_greedy_equals_full_forward_rollout(self):
    for prompt, tokens in zip(PROMPTS, self.greedy.tokens):
      want = np.asarray(greedy_rollout(self.model, jnp.asarray([prompt]), 10))[0, len(prompt):]
      self.assertEqual(tokens, want.tolist())

  def test_bf16_decodes_and_follows_its_full_forward(self):
    """BF16 weights and activations decode on every backend (XLA:CPU has no BF16 x BF16 -> F32 dot for the
    probabilities x values layout); each greedy token is the argmax of the uncached bf16 forward over the
    generated text, to within 4 bf16 ulps of the logits' magnitude (the cached absorbed and uncached forms
    round differently)."""
    model = random_model(TINY, seed=3, rt=BF16)
    for prompt, tokens in zip(PROMPTS, generate(model, PROMPTS, 10).tokens):
      logits_TW = np.asarray(forward(model, jnp.asarray([prompt + tokens])).logits_BTW[0].astype(jnp.float32))
      steps_JW = logits_TW[len(prompt) - 1:-1]
      gaps_J = steps_JW.max(axis=-1) - steps_JW[np.arange(len(tokens)), tokens]
      self.assertLessEqual(gaps_J.max(), 4 * 2.0 ** -8 * np.abs(logits_TW).max())

  def test_rows_do_not_affect_each_other(self):
    for prompt, tokens in zip(PROMPTS, self.greedy.tokens):
      self.assertEqual(generate(self.model, [prompt], 10).tokens[0], tokens)

  def test_unrolled_model_reuses_its_unstacked_copy_until_its_weights_change(self):
    rt = Runtime(scan_layers=False)
    model, other = random_model(TINY, seed=3, rt=rt), random_model(TINY, seed=4, rt=rt)
    self.assertEqual(generate(model, PROMPTS, 10).tokens, self.greedy.tokens)  # seed 3, as self.model
    self.assertIs(generate_lib._decoder(model)[0], generate_lib._decoder(model)[0])
    self.assertIsNot(generate_lib._decoder(model)[0], model)  # its per-layer copy
    want = generate(other, PROMPTS, 10).tokens
    self.assertNotEqual(want, self.greedy.tokens)
    nnx.update(model, nnx.state(other))  # new arrays in the same model: its old copy must not be decoded
    self.assertEqual(generate(model, PROMPTS, 10).tokens, want)

  @parameterized.parameters(CacheForm.NAIVE, CacheForm.ABSORBED)
  def test_cache_forms_agree(self, form):
    self.assertEqual(generate(self.model, PROMPTS, 10, cache=form).tokens, self.greedy.tokens)

  def test_speculative_greedy_equals_plain_on_random_model(self):
    spec = generate(self.model, PROMPTS, 10, speculative=True)
    self.assertEqual(spec.tokens, self.greedy.tokens)
    self.assertGreater(spec.drafts, 0)

  def test_speculative_greedy_equals_plain_on_trained_model(self):
    model = trained_tiny()
    prompts = [[3, 4, 5, 6], [9, 10, 11, 12, 13, 3, 4]]
    plain = generate(model, prompts, 24)
    spec = generate(model, prompts, 24, speculative=True)
    self.assertEqual(spec.tokens, plain.tokens)
    self.assertGreater(spec.accepted / spec.drafts, 0.5)  # the MTP module learned the pattern
    self.assertLess(spec.steps, plain.steps)

  @parameterized.parameters(('int4', 32), ('mxfp4', 32))
  def test_4bit_experts_decode_and_keep_the_cross_entropy(self, fmt, group):
    model = trained_tiny()
    q = held.experts_4bit(model, fmt, group)
    self.assertEqual(q.mtp[0].block.ffn.experts.w1.dtype, jnp.uint8)  # MTP's experts too
    reference = dequantized_copy(model, fmt, group)
    prompts = [[3, 4, 5, 6], [9, 10, 11]]
    self.assertEqual(generate(q, prompts, 12, speculative=True).tokens, generate(reference, prompts, 12).tokens)
    pattern = jnp.tile(jnp.arange(3, 3 + 11), 8)[:65]
    batch = jnp.stack([jnp.roll(pattern, -i) for i in range(4)])
    rng = np.random.default_rng(0)
    noisy = jnp.where(rng.random(batch.shape) < 0.2, rng.integers(0, 256, batch.shape), batch)  # a harder text
    ce = lambda m: float(cross_entropy(forward(m, noisy[:, :-1]).logits_BTW, noisy[:, 1:]))
    full, quantized = ce(model), ce(q)
    # The demo run measured +0.00% (int4 g32) and +0.01% (MXFP4) (bench/quant4_quality.py); 1% is the bar.
    self.assertLess(abs(quantized - full), 0.01 * full, (full, quantized))

  def test_stop_tokens_and_streaming(self):
    stop = self.greedy.tokens[0][3]
    out = generate(self.model, PROMPTS, 10, stop_tokens=[stop])
    self.assertEqual(out.tokens[0], self.greedy.tokens[0][:4])  # the stop token ends the row, included
    for row in (1, 2):
      want = self.greedy.tokens[row]
      self.assertEqual(out.tokens[row], want[:want.index(stop) + 1] if stop in want else want)
    streamed = []
    generate(self.model, PROMPTS[:1], 6, on_step=lambda new: streamed.extend(new[0]))
    self.assertEqual(streamed, self.greedy.tokens[0][:6])

  def test_sampling_is_seeded(self):
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(self.model, PROMPTS, 8, params, seed=4)
    self.assertEqual(a.tokens, generate(self.model, PROMPTS, 8, params, seed=4).tokens)
    self.assertNotEqual(a.tokens, generate(self.model, PROMPTS, 8, params, seed=5).tokens)

  def test_errors(self):
    m = self.model.cfg.max_seq_len
    with self.assertRaisesRegex(ValueError, f'prompt length 120 \\+ max_new_tokens 20 exceeds the model max_seq_len '
                                f'{m}: at most {m - 120} new tokens fit'):
      generate(self.model, [[1] * 120], 20)
    # Speculative decoding writes one position past the last token: the limit is one lower, and says why.
    with self.assertRaisesRegex(ValueError, f'max_new_tokens {m - 120} \\+ 1 \\(a speculative step writes its draft '
                                f'one position further\\) exceeds the model max_seq_len {m}: at most {m - 121}'):
      generate(self.model, [[1] * 120], m - 120, speculative=True)
    for params, field in ((SamplingParams(temperature=float('nan')), 'temperature=nan'),
                          (SamplingParams(temperature=float('inf')), 'temperature=inf'),
                          (SamplingParams(top_p=float('nan')), 'top_p=nan'), (SamplingParams(top_k=-1), 'top_k=-1')):
      with self.assertRaisesRegex(ValueError, field):
        generate(self.model, [[1]], 4, params)
    with self.assertRaisesRegex(ValueError, 'at least one token'):
      generate(self.model, [[1, 2], []], 4)
    with self.assertRaisesRegex(ValueError, 'MTP module'):
      generate(random_model(TINY.replace(n_mtp_layers=0)), [[1]], 4, speculative=True)
    with self.assertRaisesRegex(FileNotFoundError, 'not a training run'):
      restore_model(self.create_tempdir().full_path)


class MeshTest(parameterized.TestCase):
  """Decoding on 8 CPU devices: rows over data x expert, routed experts over 'expert' (3 prompts pad to 8 rows)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model, cls.greedy = random_tiny()
    cls.trained, cls.trained_prompts = trained_tiny(), [[3, 4, 5, 6], [9, 10, 11, 12, 13, 3, 4]]
    cls.trained_plain = generate(cls.trained, cls.trained_prompts, 16)

  @parameterized.parameters((2, 4), (1, 8), (8, 1))
  def test_tokens_equal_one_device(self, data, expert):
    mesh = sharding.make_mesh(data=data, expert=expert)
    self.assertEqual(TINY.n_routed_experts % expert, 0)
    with mock.patch.object(expert_parallel, 'routed', wraps=expert_parallel.routed) as routed:
      self.assertEqual(generate(self.model, PROMPTS, 10, mesh=mesh).tokens, self.greedy.tokens)
      # Traced afresh for this mesh: the MoE layers dispatched over 'expert' wherever it spans devices.
      self.assertEqual(routed.call_count > 0, expert > 1)
    spec = generate(self.trained, self.trained_prompts, 16, mesh=mesh, speculative=True)
    self.assertEqual(spec.tokens, self.trained_plain.tokens)
    self.assertGreater(spec.accepted, 0)  # kept drafts too, not only the rejection path

  def test_sampled_tokens_equal_one_device(self):
    params = SamplingParams(temperature=1.0, top_k=20)
    mesh = sharding.make_mesh(data=2, expert=4)
    self.assertEqual(generate(self.model, PROMPTS, 6, params, seed=4, mesh=mesh).tokens,
                     generate(self.model, PROMPTS, 6, params, seed=4).tokens)

  def test_cache_rows_split_over_the_batch_devices(self):
    mesh = sharding.make_mesh(data=2, expert=4)
    for form, rows_dim in ((CacheForm.ABSORBED, 1), (CacheForm.FP8, 1), (CacheForm.NAIVE, 1)):
      cache = jax.eval_shape(lambda: self.model.init_cache(8, 32, form))
      specs = jax.tree.leaves(kv.shardings(cache, mesh), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
      self.assertLen(specs, len(jax.tree.leaves(cache)))
      for spec in specs:  # stacked [L, B, ...] and the MTP depth's [B, ...]: only the rows are split
        parts = [p for p in spec.spec if p is not None]
        self.assertEqual(parts, [('data', 'expert')])
        self.assertIn(spec.spec.index(('data', 'expert')), (0, rows_dim))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'n_routed_experts=8 does not divide by the mesh.s expert axis \\(3'):
      generate(self.model, PROMPTS, 4, mesh=sharding.make_mesh(data=1, expert=3))
    with self.assertRaisesRegex(ValueError, 'mesh.pipeline=2 must be 1'):
      generate(self.model, PROMPTS, 4, mesh=sharding.make_mesh(data=2, expert=2, pipeline=2))


class SamplingTest(absltest.TestCase):

  def test_filters(self):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: np.isfinite(np.asarray(filtered_logits(logits, p)))[0].tolist()
    self.assertEqual(kept(SamplingParams(1.0, top_k=2)), [True, True, False, False])
    self.assertEqual(kept(SamplingParams(1.0, top_p=0.7)), [True, True, False, False])  # 0.5 < 0.7 <= 0.8
    self.assertEqual(kept(SamplingParams(1.0, top_p=0.5)), [True, False, False, False])
    self.assertEqual(int(sample(logits, jax.random.key(0), SamplingParams())[0]), 0)

  def test_speculative_acceptance_is_lossless(self):
    """Drafts from q, the acceptance rule, resampling from max(p - q, 0): emitted tokens follow p exactly."""
    n = 200_000
    p_logits = jnp.log(jnp.array([0.45, 0.25, 0.2, 0.1]))
    q_logits = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4]))  # a poor draft model
    params = SamplingParams(temperature=1.0)
    draft = jax.random.categorical(jax.random.key(1), jnp.broadcast_to(q_logits, (n, 4)), axis=-1)
    accepted, token = accept_draft(jnp.broadcast_to(p_logits, (n, 4)), jnp.broadcast_to(q_logits, (n, 4)), draft,
                                   jax.random.key(2), params)
    freq = np.bincount(np.asarray(token), minlength=4) / n
    np.testing.assert_allclose(freq, [0.45, 0.25, 0.2, 0.1], atol=0.005)
    expected_acceptance = float(jnp.sum(jnp.minimum(jnp.exp(p_logits), jnp.exp(q_logits))))
    self.assertAlmostEqual(float(jnp.mean(accepted)), expected_acceptance, delta=0.005)


class TransformersGenerateTest(absltest.TestCase):

  def test_greedy_tokens_equal_transformers_generate(self):
    torch = require('torch')
    from deepseek_jax.hf import load_hf
    hf = random_hf_model()
    path = os.path.join(self.create_tempdir().full_path, 'ckpt')
    hf.save_pretrained(path)
    _, model = load_hf(path)
    prompts = [[5, 17, 200, 3], [42, 8]]
    ours = generate(model, prompts, 12).tokens
    for prompt, tokens in zip(prompts, ours):
      with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
      self.assertEqual(tokens, want[0, len(prompt):].tolist())
