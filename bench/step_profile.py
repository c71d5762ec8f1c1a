r"""Where a training step's time goes, ours against transformers', at the demo shapes (no MTP: transformers
has none): forward, backward and the update timed on their own, then each framework's profiler splitting its
step into matrix products and everything else.

  python bench/step_profile.py [--batch=16 --seq=128 --steps=7]

Phases: the jitted loss (forward), loss + gradients (forward + backward), the whole step (+ AdamW, the
router-bias update, metrics), timed in turn with transformers' forward, forward + backward, and step (+ torch
AdamW, gradient clipping); backward = (forward + backward) - forward, update = step - (forward + backward).
Kinds: our step under jax.profiler, each executed XLA op's time (summed over threads) classed by its HLO
metadata (op_name): dot_general (XLA's matmuls), buffer_callback (the CPU's grouped expert GEMMs, host_gmm.py),
the rest; transformers' step under torch.profiler, each aten op's self CPU time: mm / bmm / addmm / matmul
kernels against the rest. Writes the "Training step, part by part" section of docs/benchmarks.md.
"""

import collections
import functools
import glob
import os
import re
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402
from bench.timing import median_step_seconds  # noqa: E402

_BATCH = flags.DEFINE_integer('batch', 16, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per sequence.')
_STEPS = flags.DEFINE_integer('steps', 7, 'Timed runs of each phase (median) after 2 warm-up runs.')

_TORCH_MATMULS = ('aten::mm', 'aten::bmm', 'aten::addmm', 'aten::baddbmm', 'aten::addbmm')


def our_phases(cfg, rt, tokens):
  """Run functions for our forward, forward + backward and whole step, and the compiled step with its
  arguments (for the profile)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepseek_jax.model import DeepSeekV3
  from deepseek_jax.optimizer import adamw
  from deepseek_jax.train_step import Hyper, _grads_and_terms, init_train_state, train_step
  tx = adamw()
  graphdef, state = init_train_state(nnx.jit(DeepSeekV3, static_argnums=(0, 1))(cfg, rt, nnx.Rngs(0)), tx)
  hyper = Hyper(*(jnp.float32(v) for v in (1e-4, 1e-3, 0.3, 1e-4)))
  batch = jnp.asarray(tokens)[None]
  grads = jax.jit(lambda s, b: _grads_and_terms(graphdef, s.params, s.bias, b[0], hyper))
  loss = jax.jit(lambda s, b: _loss(graphdef, s, b[0], hyper))
  step = jax.jit(functools.partial(train_step, graphdef, tx), donate_argnums=0).lower(state, batch, hyper).compile()
  box = [state]

  def run_step():
    box[0], metrics = step(box[0], batch, hyper)
    jax.block_until_ready(metrics['loss'])

  runs = {'forward': lambda: jax.block_until_ready(loss(box[0], batch)),
          'forward + backward': lambda: jax.block_until_ready(grads(box[0], batch)),
          'step': run_step}
  return runs, step, box, (batch, hyper)


def _loss(graphdef, state, tokens_BS, hyper):
  from flax import nnx
  from deepseek_jax.loss import loss_fn
  model = nnx.merge(graphdef, state.params, state.bias)
  return loss_fn(model, tokens_BS, mtp_lambda=hyper.mtp_lambda, balance_alpha=hyper.balance_alpha).total


def hf_phases(cfg, tokens):
  import torch
  import transformers
  from deepseek_jax.hf_config import to_hf
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**to_hf(cfg))).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.from_numpy(tokens).long()
  loss = lambda: model(ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts labels internally

  def forward():
    with torch.no_grad():
      loss()

  def backward():
    optimizer.zero_grad()
    loss().backward()

  def step():
    backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  return {'forward': forward, 'forward + backward': backward, 'step': step}


def op_names(compiled) -> dict:
  """HLO instruction name -> its op_name metadata, from the compiled module's text."""
  names = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
    if m:
      names[m.group(1)] = m.group(2)
  return names


def our_kinds(step, box, args, n: int) -> dict:
  """Milliseconds per step of XLA ops by kind (dot_general, buffer_callback, other), under jax.profiler."""
  import jax
  from jax.profiler import ProfileData
  names = op_names(step)
  directory = tempfile.mkdtemp()
  jax.profiler.start_trace(directory)
  for _ in range(n):
    box[0], metrics = step(box[0], *args)
    jax.block_until_ready(metrics['loss'])
  jax.profiler.stop_trace()
  trace = ProfileData.from_file(sorted(glob.glob(os.path.join(directory, '**', '*.xplane.pb'), recursive=True))[-1])
  ns = collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        op = names.get(event.name)
        if op is not None:
          kind = next((k for k in ('dot_general', 'buffer_callback') if k in op.rsplit('/', 1)[-1]), 'other')
          ns[kind] += event.duration_ns
  return {kind: v / n / 1e6 for kind, v in ns.items()}


def hf_kinds(step, n: int) -> dict:
  """Milliseconds per step of aten ops' self CPU time: matmul kernels against the rest, under torch.profiler."""
  import torch
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    for _ in range(n):
      step()
  us = collections.Counter()
  for event in profile.key_averages():
    if event.key.startswith('aten::'):
      us['matmul' if event.key in _TORCH_MATMULS else 'other'] += event.self_cpu_time_total
  return {kind: v / n / 1e3 for kind, v in us.items()}


def main(argv):
  del argv
  import numpy as np
  import jax
  import torch
  from configs import demo
  from deepseek_jax.run_config import model_config, runtime
  base, rt = model_config(demo.get_config()), runtime(demo.get_config())
  cfg = base.replace(n_mtp_layers=0)
  b, t, steps = _BATCH.value, _SEQ.value, _STEPS.value
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  ours, step, box, args = our_phases(cfg, rt, tokens)
  theirs = hf_phases(cfg, tokens)
  timed = median_step_seconds({**{('ours', k): f for k, f in ours.items()},
                               **{('hf', k): f for k, f in theirs.items()}}, steps)
  ms = {who: {'forward': timed[who, 'forward'] * 1e3,
              'backward': (timed[who, 'forward + backward'] - timed[who, 'forward']) * 1e3,
              'update': (timed[who, 'step'] - timed[who, 'forward + backward']) * 1e3,
              'step': timed[who, 'step'] * 1e3} for who in ('ours', 'hf')}
  # A difference of medians under ~10 ms is within the runs' spread (it can come out negative): no ratio.
  ratio = lambda a, b: f'{a / b:.2f}x' if min(a, b) > 10 else '-'
  phase_rows = [f'| {phase} | {ms["ours"][phase]:.0f} | {ms["hf"][phase]:.0f} | {ratio(ms["ours"][phase], ms["hf"][phase])} |'
                for phase in ('forward', 'backward', 'update', 'step')]
  mine, hf = our_kinds(step, box, args, 3), hf_kinds(theirs['step'], 3)
  kind_rows = [f'| ours: XLA matmuls (dot_general) | {mine.get("dot_general", 0):.0f} |',
               f'| ours: grouped expert GEMMs (host callbacks) | {mine.get("buffer_callback", 0):.0f} |',
               f'| ours: other XLA ops | {mine.get("other", 0):.0f} |',
               f'| transformers: matmul kernels (mm, bmm, addmm, baddbmm) | {hf.get("matmul", 0):.0f} |',
               f'| transformers: other aten ops | {hf.get("other", 0):.0f} |']
  text = '\n'.join([
      f'Command: `python bench/step_profile.py --batch={b} --seq={t} --steps={steps}` on this machine '
      f'({os.cpu_count()} CPU cores; jax {jax.__version__}, torch {torch.__version__}). The demo model without '
      f'MTP ({cfg.n_routed_experts} routed experts top-{cfg.n_activated_experts}, dim {cfg.dim}, vocab '
      f'{cfg.vocab_size}), {b} x {t} random tokens; each phase the median of {steps} runs after 2 warm-up runs, '
      'all six timed in turn, each after 0.5 s idle (bench/timing.py: PyTorch\'s threads spin after its ops); '
      'backward and update are differences of medians.',
      '',
      '| phase | ours ms | transformers ms | ours / transformers |',
      '|---|---:|---:|---:|',
      *phase_rows,
      '',
      'The step by kind of op, milliseconds per step summed over threads (3 profiled steps each; ops of '
      'different threads overlap, so a column may exceed the step time; the profilers add their own cost):',
      '',
      '| kind | ms per step |',
      '|---|---:|',
      *kind_rows,
  ])
  print(text)
  replace_section('Training step, part by part', text)


if __name__ == '__main__':
  app.run(main)
