r"""Training-step memory against sequence length: the compiled step's temporaries (XLA's
`memory_analysis()`) of a small V3-shaped model at T = 1K ... 16K, with the materialised attention and
full-vocabulary logits (before) and with blockwise flash attention and the chunked head loss (after), plus
measured step times at the shorter lengths.

  python bench/long_context.py [--lengths=1024,2048,4096,8192,16384 --timed_lengths=1024,2048 --repeats=3]

Compiling needs no memory for the buffers it plans, so the "before" column can list sizes this machine could
not run. Writes the "Long context (training memory)" section of docs/benchmarks.md.
"""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402

_LENGTHS = flags.DEFINE_list('lengths', ['1024', '2048', '4096', '8192', '16384'], 'Sequence lengths compiled.')
_TIMED = flags.DEFINE_list('timed_lengths', ['1024', '2048'], 'Lengths whose steps are also run and timed.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed steps (median) after one warm-up.')

FORMS = {'before: dense attention, whole-batch logits': dict(attention='dense', head_chunk=1 << 30),
         'after: flash attention (blocks of 512), head in chunks of 1024 tokens': dict(attention='flash')}


def main(argv):
  del argv
  from deepseek_jax.config import PRESETS, Runtime
  from deepseek_jax.loss import loss_fn
  from deepseek_jax.model import DeepSeekV3
  # tiny's layout (MLA, 8 experts, MTP) with V3's head widths (128 + 64, values 128) and a 32K vocabulary.
  cfg = PRESETS['tiny'].replace(vocab_size=32768, dim=256, n_heads=4, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                v_head_dim=128, kv_lora_rank=128, q_lora_rank=128, max_seq_len=16384)
  lengths, timed = [int(t) for t in _LENGTHS.value], {int(t) for t in _TIMED.value}
  rows, temps = [], {}
  for name, fields in FORMS.items():
    model = DeepSeekV3(cfg, Runtime(**fields), nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = jax.jit(jax.value_and_grad(lambda p, tokens: loss_fn(nnx.merge(graphdef, p, rest), tokens).total))
    for t in lengths:
      tokens = jnp.asarray(np.random.default_rng(t).integers(0, cfg.vocab_size, (1, t + 1)))
      compiled = step.lower(params, tokens).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      temps[name, t] = temp
      seconds = ''
      if t in timed:
        jax.block_until_ready(compiled(params, tokens))
        times = []
        for _ in range(_REPEATS.value):
          start = time.perf_counter()
          jax.block_until_ready(compiled(params, tokens))
          times.append(time.perf_counter() - start)
        seconds = f'{statistics.median(times):.3f}'
      growth = f'{temp / temps[name, t // 2]:.2f}x' if (name, t // 2) in temps else ''
      rows.append(f'| {name} | {t:,} | {temp / 2**20:,.1f} | {growth} | {seconds} |')
      print(rows[-1], flush=True)
  h = cfg.n_heads
  body = '\n'.join([
      f'`python bench/long_context.py --lengths={",".join(_LENGTHS.value)} --timed_lengths={",".join(_TIMED.value)} '
      f'--repeats={_REPEATS.value}` on this CPU ({jax.devices()[0].device_kind}, {os.cpu_count()} cores): one '
      f'sequence, a model of tiny\'s layout with dim {cfg.dim}, {h} heads of V3\'s widths (q/k 128 + 64, v 128), '
      f'{cfg.n_routed_experts} routed experts, MTP depth 1, vocabulary {cfg.vocab_size:,}; the loss and gradients '
      'of loss_fn compiled with jax.jit. Temporaries: compiled.memory_analysis().temp_size_in_bytes; growth: '
      'against the length half as long (linear: 2x; the scores of every layer grow 4x). At T = 16K one layer\'s '
      f'fp32 scores are {h * 16384 ** 2 * 4 / 2**30:.0f} GiB for these {h} heads and the logits '
      f'{16384 * cfg.vocab_size * 4 / 2**30:.0f} GiB per depth.',
      '',
      '| form | T | step temporaries (MiB) | growth | step seconds (median) |',
      '|---|---:|---:|---:|---:|',
      *rows])
  replace_section('Long context (training memory)', body)


if __name__ == '__main__':
  app.run(main)
