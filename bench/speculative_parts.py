r"""Where a speculative decode step's time goes on this machine, part by part, against a plain step: the trunk
and head at 1 and 2 tokens a row, the MTP block, the draft's head rows, acceptance and sampling, on the
trained demo run at 1 row and at 8, each also with the routed experts taken out.

  python bench/speculative_parts.py [--workdir=runs/demo]

Each part is jitted as a loop of 16 calls whose tokens change with the iteration (so XLA cannot hoist it out
of the loop), timed as the median of 9 runs after a warm-up. "Without routed experts" traces the same parts
with every MoE layer's routed-expert output replaced by zeros (the shared experts, attention, norms and head
unchanged; the gate, whose routing only the experts use, may be compiled away with them): what a part costs
without reading a routed expert's weights. Then the weights a real plain and speculative step read (the
routed experts counted from the routing of the greedy tokens), the rate at which this machine streams a
working set of that size (`stream`: its caches decide it), and the step times measured inside
generate(): whether a speculative step's bytes alone leave it room to pay. Writes the "Speculative decoding,
part by part" section of docs/benchmarks.md.
"""

import contextlib
import functools
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.prompts import CODE_PROMPTS  # noqa: E402
from bench.report import replace_section  # noqa: E402
from bench.step_reads import routing, weight_bytes  # noqa: E402
from bench.timing import compiled_seconds, median_step_seconds  # noqa: E402

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


def routed_experts_per_step(model, prompts, tokens):
  """(plain, speculative): routed experts a decode step reads, summed over the MoE layers, mean over the
  steps: from the routing (step_reads.routing, MTP block included) over the prompts cut to the shortest and
  the greedy tokens after them (each row's `tokens`). A plain step at position p reads each trunk layer's
  experts chosen by the rows at p; a speculative one the experts of p and p + 1 in every trunk layer and in
  the MTP block's."""
  import numpy as np
  t = min(len(p) for p in prompts)
  tokens_BT = [p[:t] + list(g) for p, g in zip(prompts, tokens)]
  *trunk, mtp = routing(model, tokens_BT, mtp=True)
  steps = range(t - 1, len(tokens_BT[0]) - 2)  # the positions a decode step runs (the last needs p + 1)
  distinct = lambda e_BTK, ps: len(np.unique(e_BTK[:, ps]))
  plain = np.mean([sum(distinct(e, [p]) for e in trunk) for p in steps])
  spec = np.mean([sum(distinct(e, [p, p + 1]) for e in trunk + [mtp]) for p in steps])
  return plain, spec


def stream(nbytes, rows, passes=8):
  """(a call that streams a working set of `nbytes` of fp32 weights `passes` times through the native CPU
  kernel with `rows` rows, in one compiled loop: cpu_kernels.matmul on [256, 256] weights holding as many
  bytes, about the shape of the model's own; the bytes it streams). It runs at this machine's rate for decode steps that read those weights one
  after another, as far as their cache residency goes (the first pass finds them evicted, like a step's)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from deepseek_jax import cpu_kernels
  per = 256 * 256 * 4
  ws = [jnp.asarray(np.random.default_rng(i).standard_normal((256, 256), np.float32))
        for i in range(max(1, round(nbytes / per)))]

  def one_pass(i, total, x, ws):  # the input changes with i: no pass can be hoisted out of the loop
    return total + sum(cpu_kernels.matmul(x + i, w, None)[0, 0] for w in ws)

  run = jax.jit(lambda x, ws: jax.lax.fori_loop(0, passes, lambda i, t: one_pass(i, t, x, ws), 0.0))
  x = jnp.ones((rows, 256), jnp.float32)
  return lambda: jax.block_until_ready(run(x, ws)), passes * len(ws) * per


def step_ms(ms):
  """(plain step, speculative step): a speculative step runs the verification, the MTP block, the draft's
  head rows and the acceptance."""
  return ms[PLAIN], ms[VERIFY] + ms[MTP] + ms[DRAFT] + ms[ACCEPT]


def _l3_bytes() -> str:
  """This machine's last-level cache as lscpu reports it (Linux), for the text."""
  import subprocess
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return 'its cache size unknown'
  line = next((l for l in out.splitlines() if l.startswith('L3 cache')), None)
  return f'L3 cache {line.split(":", 1)[1].strip()}' if line else 'its cache size unknown'


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
  columns, findings, bytes_rows, verdicts = {}, [], [], []
  dense_bytes, mtp_bytes, expert_bytes = weight_bytes(model)
  for rows, prompts in batches.items():
    with_experts = speculative_parts(model, prompts)
    with routed_experts_zeroed():
      without = speculative_parts(model, prompts)
    columns[rows] = (with_experts, without)
    plain, spec = (generate(model, prompts, _NEW.value, speculative=v) for v in (False, True))
    acceptance = spec.accepted / spec.drafts
    plain_experts, spec_experts = routed_experts_per_step(model, prompts, plain.tokens)
    plain_bytes = dense_bytes + expert_bytes * plain_experts
    spec_bytes = dense_bytes + mtp_bytes + expert_bytes * spec_experts  # the head counted once
    plain_stream, plain_streamed = stream(plain_bytes, rows)
    spec_stream, spec_streamed = stream(spec_bytes, 2 * rows)
    calls = {(v, n): functools.partial(generate, model, prompts, n, speculative=v) for v in (False, True)
             for n in (_NEW.value, 2)}
    seconds = median_step_seconds({**calls, 'plain stream': plain_stream, 'spec stream': spec_stream}, 7,
                                  pause=0.0)
    short_steps = {v: generate(model, prompts, 2, speculative=v).steps for v in (False, True)}
    # ms per decode step inside generate(): a long call less a 2-token call, over the steps between
    step_ms_of = lambda v, long: (seconds[(v, _NEW.value)] - seconds[(v, 2)]) / (long.steps - short_steps[v]) * 1e3
    plain_step, spec_step = step_ms_of(False, plain), step_ms_of(True, spec)
    plain_rate, spec_rate = plain_streamed / seconds['plain stream'], spec_streamed / seconds['spec stream']
    spec_floor = spec_bytes / spec_rate * 1e3  # ms: the speculative step's weights alone, at this working set
    bytes_rows.append(
        f'| {rows} | {plain_bytes / 1e6:.1f} MB ({plain_experts:.1f}) | {spec_bytes / 1e6:.1f} MB ({spec_experts:.1f}) '
        f'| {spec_bytes / plain_bytes:.2f}x | {plain_rate / 1e9:.1f} / {spec_rate / 1e9:.1f} GB/s | '
        f'{plain_bytes / plain_rate * 1e3:.3f} / {spec_floor:.3f} ms | {plain_step:.3f} / {spec_step:.3f} ms | '
        f'{spec_step / plain_step:.2f}x | {spec_floor / plain_step:.2f}x | {1 + acceptance:.2f}x |')
    verdicts.append(
        f'at {rows} row{"s" if rows > 1 else ""} a speculative step\'s weights alone take {spec_floor:.3f} ms at the '
        f'rate this machine streams {spec_bytes / 1e6:.1f} MB, {spec_floor / plain_step:.2f}x the measured plain '
        f'step ({plain_step:.3f} ms), ' +
        (f'at or above 1 + acceptance = {1 + acceptance:.2f}x: no speculative step can pay here, whatever its '
         'other costs' if spec_floor / plain_step >= 1 + acceptance else
         f'below 1 + acceptance = {1 + acceptance:.2f}x: the bytes leave room for a speculative step to pay, '
         f'and the measured one costs {spec_step / plain_step:.2f}x'))
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
  cache = _l3_bytes()
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
      'The parts above each run alone, in a loop that keeps their own weights in the caches; a real step runs '
      'them one after the other. The weights a step reads against this machine\'s speed at that working set '
      f'({cache}): bytes by construction (the routed experts counted from the routing of the greedy tokens, '
      '`routed_experts_per_step`, per step over all MoE layers in brackets; the head counted once), the rate '
      'at which the native kernel streams a working set of that many bytes over and over with the step\'s '
      'rows (`stream`: 8 passes in one loop, 1 token a row plain, 2 speculative), the bytes\' time at that '
      'rate, and the step times '
      'measured inside generate() (a --new_tokens call less a 2-token call, over the steps between); the streams '
      'and the generate() calls timed in turn, medians of 7 rounds (`bench.timing.median_step_seconds`):',
      '',
      '| rows | plain reads | speculative reads | bytes ratio | rate plain / spec | bytes\' time plain / spec | '
      'generate step plain / spec | measured ratio | spec bytes\' time / plain step | pays below (1 + acceptance) |',
      '|---|---|---|---|---|---|---|---|---|---|',
      *bytes_rows,
      '',
      f'So {"; ".join(verdicts)}.',
  ]).rstrip()
  print(text)
  replace_section('Speculative decoding, part by part', text)


if __name__ == '__main__':
  app.run(main)
