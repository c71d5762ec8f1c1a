r"""Where a speculative decode step's time goes on this machine, part by part, against a plain step: the trunk
and head at 1 and 2 tokens a row, the MTP block, the draft's head rows, acceptance and sampling, on the
trained demo run at 1 row and at 8, each also with the routed experts taken out.

  python bench/speculative_parts.py [--workdir=runs/demo]

Each part is jitted as a loop of 16 calls whose tokens change with the iteration (so XLA cannot hoist it out
of the loop), timed as the median of 9 runs after a warm-up. "Without routed experts" traces the same parts
with every MoE layer's routed-expert output replaced by zeros (the shared experts, attention, norms and head
unchanged; the gate, whose routing only the experts use, may be compiled away with them): what a part costs
without reading a routed expert's weights. Writes the "Speculative decoding, part by part" section of
docs/benchmarks.md.
"""

import contextlib
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.prompts import CODE_PROMPTS  # noqa: E402
from bench.report import replace_section  # noqa: E402
from bench.timing import compiled_seconds  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'A trained demo run (launch/train.py --config=configs/demo.py).')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'Tokens per row of the generate() calls that measure acceptance.')

PLAIN = 'trunk + head, 1 token a row (a plain step)'
VERIFY = 'trunk + head, 2 tokens a row (verification)'
MTP = 'MTP block, 2 tokens a row'
DRAFT = 'head, 1 row each (the draft)'
HEAD2 = 'head, 2 rows each'
ACCEPT = 'acceptance + sampling'


@contextlib.contextmanager
def routed_experts_zeroed():
  """Models traced inside see every routed-expert output as zeros."""
  import jax.numpy as jnp
  from deepseek_jax import moe
  apply = moe.RoutedExperts._apply
  moe.RoutedExperts._apply = lambda self, x_XD, *args: jnp.zeros_like(x_XD)
  try:
    yield
  finally:
    moe.RoutedExperts._apply = apply


def speculative_parts(model, prompts, repeats=16):
  """Milliseconds of each part of a plain and of a speculative decode step for len(prompts) rows, after a
  prefill of the prompts (cut to the shortest): each part jitted as a loop of `repeats` calls whose tokens
  change with the iteration (so none is hoisted out of the loop), median of 9 after a warm-up, divided by
  `repeats`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepseek_jax.sampling import SamplingParams, accept_draft, sample
  decoder = model.unstacked()
  graphdef, weights = nnx.split(decoder)
  b, t, v = len(prompts), min(len(p) for p in prompts), model.cfg.vocab_size
  out = jax.jit(lambda w, c: nnx.merge(graphdef, w).forward(jnp.asarray([p[:t] for p in prompts]), cache=c))(
      weights, decoder.init_cache(b, t + 8))
  cache, hidden_BD, logits_BW = out.cache, out.hidden_BTD[:, -1], out.logits_BTW[:, -1]
  greedy, key = SamplingParams(), jax.random.key(0)
  tokens = lambda i, n: (jnp.arange(b * n, dtype=jnp.int32).reshape(b, n) * 7 + i) % v  # rows differ
  positions = lambda n: jnp.broadcast_to(t + jnp.arange(n, dtype=jnp.int32), (b, n))
  parts = {
      PLAIN: lambda m, i: m.forward(tokens(i, 1), positions(1), cache).logits_BTW,
      VERIFY: lambda m, i: m.forward(tokens(i, 2), positions(2), cache).logits_BTW,
      MTP: lambda m, i: m.mtp_forward(tokens(i, 2), jnp.stack([hidden_BD, -hidden_BD], 1) + i, positions(2),
                                      cache).hidden_PBTD,
      DRAFT: lambda m, i: m.head(hidden_BD + i),
      HEAD2: lambda m, i: m.head(jnp.concatenate([hidden_BD, -hidden_BD]) + i),
      ACCEPT: lambda m, i: (accept_draft(logits_BW + i, logits_BW * 0.5, tokens(i, 1)[:, 0], key, greedy)[1] +
                            sample(logits_BW - i, key, greedy)),
  }
  ms = {}
  for name, part in parts.items():
    def run(w, part=part):
      m = nnx.merge(graphdef, w)
      return jax.lax.fori_loop(0, repeats, lambda i, acc: acc + part(m, i).astype(jnp.float32).sum(), 0.0)

    ms[name] = compiled_seconds(jax.jit(run), weights) / repeats * 1e3
  return ms


def step_ms(ms):
  """(plain step, speculative step): a speculative step runs the verification, the MTP block, the draft's
  head rows and the acceptance."""
  return ms[PLAIN], ms[VERIFY] + ms[MTP] + ms[DRAFT] + ms[ACCEPT]


def main(argv):
  del argv
  import jax
  from configs import demo
  from deepseek_jax.generate import generate
  from deepseek_jax.run_config import runtime
  from deepseek_jax.tokenizer import run_codec
  from deepseek_jax.trainer import restore_model
  logging.set_verbosity(logging.WARNING)
  _, model, step = restore_model(_WORKDIR.value, runtime(demo.get_config()))
  codec = run_codec(_WORKDIR.value)
  batches = {1: [codec.encode(CODE_PROMPTS[0])], 8: [codec.encode(p) for p in CODE_PROMPTS]}
  columns, findings = {}, []
  for rows, prompts in batches.items():
    with_experts = speculative_parts(model, prompts)
    with routed_experts_zeroed():
      without = speculative_parts(model, prompts)
    columns[rows] = (with_experts, without)
    plain = generate(model, prompts, _NEW.value)
    spec = generate(model, prompts, _NEW.value, speculative=True)
    acceptance = spec.accepted / spec.drafts
    (plain_ms, spec_ms), (plain0_ms, spec0_ms) = step_ms(with_experts), step_ms(without)
    experts_plain, experts_spec = plain_ms - plain0_ms, spec_ms - spec0_ms
    trunk1, trunk2 = with_experts[PLAIN] - without[PLAIN], with_experts[VERIFY] - without[VERIFY]
    findings.append(
        f'At {rows} row{"s" if rows > 1 else ""}: a speculative step costs {spec_ms:.3f} ms, '
        f'{spec_ms / plain_ms:.2f}x a plain step, and pays only below 1 + acceptance = {1 + acceptance:.2f}x '
        f'({acceptance:.0%} of {spec.drafts} drafts kept over {_NEW.value} new tokens a row, the tokens '
        f'{"the same as" if spec.tokens == plain.tokens else "NOT the same as"} plain greedy). The step ratio is '
        f'the mediant of two ratios, so it lies between them: without the routed experts a speculative step costs '
        f'{spec0_ms / plain0_ms:.2f}x a plain one, and the routed experts cost {experts_spec:.3f} ms in a '
        f'speculative step against {experts_plain:.3f} ms in a plain one ({experts_spec / experts_plain:.2f}x; '
        f'the trunk\'s alone {trunk2:.3f} ms at 2 tokens a row against {trunk1:.3f} ms at 1, '
        f'{trunk2 / trunk1:.2f}x).')
  header = ' | '.join(f'{r} row{"s" if r > 1 else ""} | {r} row{"s" if r > 1 else ""}, without routed experts'
                      for r in columns)
  rows_md = [f'| {name} | ' + ' | '.join(f'{w[name]:.3f} | {z[name]:.3f}' for w, z in columns.values()) + ' |'
             for name in columns[1][0]]
  steps_md = ['| speculative step (verification + MTP + draft head + acceptance) | ' +
              ' | '.join(f'{step_ms(w)[1]:.3f} | {step_ms(z)[1]:.3f}' for w, z in columns.values()) + ' |']
  text = '\n'.join([
      f'Command: `python bench/speculative_parts.py --workdir={_WORKDIR.value}` ({os.cpu_count()} CPU cores, jax '
      f'{jax.__version__}): the trained demo run at step {step}, fp32, after the prompt {CODE_PROMPTS[0]!r} (1 row) '
      'or the 8 code prompts of "Decoding" cut to the shortest (8 rows). Milliseconds per call; "without routed '
      'experts": every routed-expert output traced as zeros (bench/speculative_parts.py):',
      '',
      f'| part | {header} |',
      '|---|' + '---|' * (2 * len(columns)),
      *rows_md,
      *steps_md,
      '',
      *[f + '\n' for f in findings],
  ]).rstrip()
  print(text)
  replace_section('Speculative decoding, part by part', text)


if __name__ == '__main__':
  app.run(main)
