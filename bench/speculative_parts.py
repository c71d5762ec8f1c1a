r"""Where a speculative decode step's time goes on this machine, part by part, against a plain step: the trunk
and head at 1 and 2 tokens, the MTP block, the draft's head row, acceptance and sampling, on the trained demo
run with one row.

  python bench/speculative_parts.py [--workdir=runs/demo]

Each part is jitted as a loop of 16 calls whose tokens change with the iteration (so XLA cannot hoist it out
of the loop), timed as the median of 9 runs after a warm-up. Writes the "Speculative decoding, part by part"
section of docs/benchmarks.md.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402
from bench.timing import compiled_seconds  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'A trained demo run (launch/train.py --config=configs/demo.py).')
_PROMPT = flags.DEFINE_string('prompt', 'def ', 'The prompt prefilled before the step.')


def speculative_parts(model, prompt, repeats=16):
  """Milliseconds of each part of a plain and of a speculative decode step with one row, after a prefill of
  `prompt`: each part jitted as a loop of `repeats` calls whose tokens change with the iteration (so none is
  hoisted out of the loop), median of 9 after a warm-up, divided by `repeats`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepseek_jax.sampling import SamplingParams, accept_draft, sample
  decoder = model.unstacked()
  graphdef, weights = nnx.split(decoder)
  t, v = len(prompt), model.cfg.vocab_size
  out = jax.jit(lambda w, c: nnx.merge(graphdef, w).forward(jnp.asarray([prompt]), cache=c))(
      weights, decoder.init_cache(1, t + 8))
  cache, hidden_RD = out.cache, out.hidden_BTD[0, -3:]  # three positions' states: the head's rows
  greedy, key = SamplingParams(), jax.random.key(0)
  tokens = lambda i, n: (jnp.arange(n, dtype=jnp.int32)[None] + i) % v
  positions = lambda n: t + jnp.arange(n, dtype=jnp.int32)[None]
  parts = {
      'trunk + head, 1 token (a plain step)': lambda m, i: m.forward(tokens(i, 1), positions(1), cache).logits_BTW,
      'trunk + head, 2 tokens (verification)': lambda m, i: m.forward(tokens(i, 2), positions(2), cache).logits_BTW,
      'MTP block, 2 tokens': lambda m, i: m.mtp_forward(tokens(i, 2), out.hidden_BTD[:, -2:] + i, positions(2),
                                                        cache).hidden_PBTD,
      'head, 1 row (the draft)': lambda m, i: m.head(hidden_RD[:1] + i),
      'head, 2 rows': lambda m, i: m.head(hidden_RD[:2] + i),
      'acceptance + sampling': lambda m, i: (
          accept_draft(out.logits_BTW[:, -1] + i, out.logits_BTW[:, -2], tokens(i, 1)[0], key, greedy)[1] +
          sample(out.logits_BTW[:, -1] - i, key, greedy)),
  }
  ms = {}
  for name, part in parts.items():
    def run(w, part=part):
      m = nnx.merge(graphdef, w)
      return jax.lax.fori_loop(0, repeats, lambda i, acc: acc + part(m, i).astype(jnp.float32).sum(), 0.0)

    ms[name] = compiled_seconds(jax.jit(run), weights) / repeats * 1e3
  return ms


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
  prompt = run_codec(_WORKDIR.value).encode(_PROMPT.value)
  ms = speculative_parts(model, prompt)
  spec = generate(model, [prompt], 64, speculative=True)
  acceptance = spec.accepted / spec.drafts
  plain_ms = ms['trunk + head, 1 token (a plain step)']
  spec_ms = (ms['trunk + head, 2 tokens (verification)'] + ms['MTP block, 2 tokens'] +
             ms['head, 1 row (the draft)'] + ms['acceptance + sampling'])
  rows = [f'| {name} | {value:.3f} |' for name, value in ms.items()]
  text = '\n'.join([
      f'Command: `python bench/speculative_parts.py --workdir={_WORKDIR.value}` ({os.cpu_count()} CPU cores, jax '
      f'{jax.__version__}): the trained demo run at step {step}, one row after the prompt {_PROMPT.value!r}, '
      'fp32. Milliseconds per call:',
      '',
      '| part | ms |',
      '|---|---|',
      *rows,
      '',
      f'A speculative step runs the verification, the MTP block, the draft head row and the acceptance: '
      f'{spec_ms:.3f} ms, {spec_ms / plain_ms:.2f}x a plain step, for 1 + acceptance tokens; with this run\'s '
      f'{acceptance:.0%} acceptance (64 new tokens) it pays only below {1 + acceptance:.2f}x. The verification '
      f'alone, trunk and head at 2 tokens, costs {ms["trunk + head, 2 tokens (verification)"] / plain_ms:.2f}x '
      'them at 1 token, and the head with 2 rows '
      f'{ms["head, 2 rows"] / ms["head, 1 row (the draft)"]:.2f}x the head with 1 (the same weight bytes).',
  ])
  print(text)
  replace_section('Speculative decoding, part by part', text)


if __name__ == '__main__':
  app.run(main)
