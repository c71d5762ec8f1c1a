"""The training loss against a hand-written reference: next-token CE, masked MTP CE, balance loss."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

from deepseek_jax.config import PRESETS, Runtime
from deepseek_jax.layers import Linear
from deepseek_jax.loss import balance_loss, cross_entropy, head_cross_entropy, loss_fn
from deepseek_jax.moe import MoEStats
from tests.helpers import forward, mtp_forward, random_model

TINY = PRESETS['tiny']


def ce(logits, targets):
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


class LossTest(parameterized.TestCase):

  # head_chunk 5: the 36 positions in 8 chunks, the last padded; 1024: one chunk
  @parameterized.product(depth=(1, 2), head_chunk=(1024, 5))
  def test_matches_reference(self, depth, head_chunk):
    cfg = TINY.replace(n_mtp_layers=depth)
    model = random_model(cfg, seed=0, rt=Runtime(head_chunk=head_chunk))
    seq = np.asarray(jax.random.randint(jax.random.key(1), (3, 13), 0, cfg.vocab_size))
    lam, alpha = 0.3, 0.01
    terms = nnx.jit(lambda m, s: loss_fn(m, s, mtp_lambda=lam, balance_alpha=alpha))(model, jnp.asarray(seq))

    inputs, targets = seq[:, :-1], seq[:, 1:]
    out = forward(model, jnp.asarray(inputs))
    want_ce = ce(out.logits_BTW, targets).mean()
    mtp = mtp_forward(model, jnp.asarray(inputs))
    t = inputs.shape[1]
    # Depth k at position i predicts seq[i + k + 1] = targets[i + k]; positions i >= t - k have no target.
    want_mtp = lam * np.mean([ce(mtp.logits_PBTW[k - 1][:, :t - k], targets[:, k:]).mean()
                              for k in range(1, depth + 1)])
    stats = [out.moe_stats['moe_layers/ffn']] + [mtp.moe_stats[f'mtp/{k}/block/ffn'] for k in range(depth)]
    stacked = [s if s.counts_E.ndim == 2 else jax.tree.map(lambda a: a[None], s) for s in stats]  # [L, ...]
    want_bal = alpha * sum(
        np.mean([np.dot(s.load_BE[l, b], s.prob_BE[l, b]) for b in range(3)])
        for s in stacked for l in range(s.counts_E.shape[0]))
    np.testing.assert_allclose(terms.ce, want_ce, rtol=1e-5)
    np.testing.assert_allclose(terms.mtp, want_mtp, rtol=1e-5)
    np.testing.assert_allclose(terms.balance, want_bal, rtol=1e-5)
    np.testing.assert_allclose(terms.total, want_ce + want_mtp + want_bal, rtol=1e-5)
    # Counts keyed by the path of the MoE layer whose router bias they update.
    self.assertEqual({path: c.shape for path, c in terms.expert_counts.items()},
                     {'moe_layers/ffn': (cfg.n_moe_layers, cfg.n_routed_experts),
                      **{f'mtp/{k}/block/ffn': (cfg.n_routed_experts,) for k in range(depth)}})
    for counts in terms.expert_counts.values():
      np.testing.assert_array_equal(counts.sum(-1), 3 * 12 * cfg.n_activated_experts)

  def test_chunked_head_gradients_and_memory(self):
    cfg = TINY.replace(vocab_size=4096, dim=64)
    head = Linear(cfg.dim, cfg.vocab_size, ('embed', 'vocab'), cfg, Runtime(), nnx.Rngs(0), quantize=False)
    graphdef, kernel = nnx.split(head)
    hidden = jax.random.normal(jax.random.key(0), (4, 512, cfg.dim)) * 3
    targets = jax.random.randint(jax.random.key(1), (4, 512), 0, cfg.vocab_size)
    mask = jax.random.uniform(jax.random.key(2), (4, 512)) > 0.3

    def grad(loss):
      return jax.jit(jax.value_and_grad(lambda k, h: loss(nnx.merge(graphdef, k), h), argnums=(0, 1)))

    chunked = grad(lambda m, h: head_cross_entropy(m, h, targets, mask, chunk=120))  # 2048 rows: 18 chunks
    whole = grad(lambda m, h: cross_entropy(m(h), targets, mask))
    one_chunk = grad(lambda m, h: head_cross_entropy(m, h, targets, mask, chunk=1 << 30))  # not padded to 2^30
    got, want = chunked(kernel, hidden), whole(kernel, hidden)
    for got in (got, one_chunk(kernel, hidden)):
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())  # fp32, summation order only
    # The [2048, 4096] fp32 logits (32 MB) exist in the unchunked step; the chunked one holds a few chunks'
    # worth ([120, 4096]: 2 MB, the logits and their exponentials), never all of them.
    logits_bytes, chunk_bytes = 4 * 512 * 4096 * 4, 120 * 4096 * 4
    temporaries = lambda f: f.lower(kernel, hidden).compile().memory_analysis().temp_size_in_bytes
    self.assertGreater(temporaries(whole), logits_bytes)
    self.assertLess(temporaries(chunked), 3 * chunk_bytes)

  def test_balance_gradient_only_through_p(self):
    load = jnp.array([[[2.0, 0.0, 1.0]]])
    prob = jnp.array([[[0.5, 0.2, 0.3]]])
    g_load, g_prob = jax.grad(lambda f, p: balance_loss(MoEStats(None, f, p)), argnums=(0, 1))(load, prob)
    np.testing.assert_array_equal(g_load, 0.0)
    np.testing.assert_allclose(g_prob, load)

  def test_balanced_routing_scores_one(self):
    # Perfect balance (f_i = 1, P_i = 1/E) gives sum_i f_i P_i = 1: the loss's minimum scale (Eq. 17).
    e = 8
    self.assertAlmostEqual(float(balance_loss(MoEStats(None, jnp.ones((1, 2, e)), jnp.full((1, 2, e), 1 / e)))), 1.0)

  def test_loss_gradients_are_finite_and_reach_mtp(self):
    model = random_model(TINY, seed=2)
    seq = jax.random.randint(jax.random.key(3), (2, 9), 0, TINY.vocab_size)
    params = nnx.state(model, nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      return loss_fn(nnx.merge(graphdef, p, rest), seq).total

    grads = jax.jit(jax.grad(loss))(params)
    flat = dict(nnx.to_flat_state(grads))
    self.assertTrue(all(np.all(np.isfinite(v[...])) for v in flat.values()))
    self.assertGreater(float(jnp.abs(flat[('mtp', 0, 'eh_proj', 'kernel')][...]).max()), 0)
    self.assertNotIn(('moe_layers', 'ffn', 'gate', 'bias'), flat)  # the router bias is not a Param
