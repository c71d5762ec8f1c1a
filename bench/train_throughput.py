r"""Training throughput: our jitted train step against transformers' DeepseekV3ForCausalLM
forward + backward + torch AdamW, same shapes and batch, both timed in this one process (median of several
steps after warm-up); then our step time as the number of routed experts grows at fixed top-k and expert size.

  python bench/train_throughput.py [--batch=16 --seq=128 --steps=5]

Writes its table into docs/benchmarks.md (section "Training throughput").
"""

import functools
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402

_BATCH = flags.DEFINE_integer('batch', 16, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per sequence.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (median reported) after 2 warm-up steps.')
_EXPERTS = flags.DEFINE_list('experts', ['8', '16', '32', '64'], 'Routed expert counts for the scaling sweep.')


def median_step_seconds(run_step, steps: int) -> float:
  for _ in range(2):
    run_step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def ours(cfg, rt, tokens, steps):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepseek_jax.model import DeepSeekV3
  from deepseek_jax.optimizer import adamw
  from deepseek_jax.train_step import Hyper, init_train_state, train_step

  tx = adamw()
  graphdef, state = init_train_state(nnx.jit(DeepSeekV3, static_argnums=(0, 1))(cfg, rt, nnx.Rngs(0)), tx)
  step = jax.jit(functools.partial(train_step, graphdef, tx), donate_argnums=0)
  hyper = Hyper(*(jnp.float32(v) for v in (1e-4, 1e-3, 0.3, 1e-4)))
  batch = jnp.asarray(tokens)[None]
  box = [state]

  def run():
    box[0], metrics = step(box[0], batch, hyper)
    jax.block_until_ready(metrics['loss'])

  return median_step_seconds(run, steps)


def hf(cfg, tokens, steps):
  import torch
  import transformers
  from deepseek_jax.hf_config import to_hf
  hf_config = transformers.DeepseekV3Config(**to_hf(cfg.replace(n_mtp_layers=0)))  # transformers has no MTP
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(hf_config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  ids = torch.from_numpy(tokens).long()

  def run():
    optimizer.zero_grad()
    loss = model(ids[:, :-1], labels=ids[:, :-1]).loss  # HF shifts labels internally
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  return median_step_seconds(run, steps)


def main(argv):
  del argv
  import numpy as np
  import torch
  from configs import demo
  from deepseek_jax import cost
  from deepseek_jax.run_config import model_config, runtime

  base, rt = model_config(demo.get_config()), runtime(demo.get_config())  # the demo training run's model
  b, t, steps = _BATCH.value, _SEQ.value, _STEPS.value
  tokens = np.random.default_rng(0).integers(0, base.vocab_size, (b, t + 1)).astype(np.int32)
  n_tokens = b * t
  rows = []
  no_mtp = base.replace(n_mtp_layers=0)
  ours_s, hf_s = ours(no_mtp, rt, tokens, steps), hf(no_mtp, tokens, steps)
  ours_mtp_s = ours(base, rt, tokens, steps)
  rows.append(f'| demo shapes, no MTP (like for like) | {n_tokens / ours_s:,.0f} | {n_tokens / hf_s:,.0f} | '
              f'{hf_s / ours_s:.2f}x |')
  rows.append(f'| demo shapes, with the MTP module (ours only) | {n_tokens / ours_mtp_s:,.0f} | - | - |')
  sweep = []
  for e in map(int, _EXPERTS.value):
    cfg = no_mtp.replace(n_routed_experts=e)
    sweep.append((e, ours(cfg, rt, tokens, steps), hf(cfg, tokens, steps)))
  first_ours, first_hf = sweep[0][1], sweep[0][2]
  sweep_rows = [f'| {e} | {o * 1e3:.0f} ms ({o / first_ours:.2f}x) | {h * 1e3:.0f} ms ({h / first_hf:.2f}x) |'
                for e, o, h in sweep]
  text = '\n'.join([
      f'Command: `python bench/train_throughput.py --batch={b} --seq={t} --steps={steps}` on this machine '
      f'({os.cpu_count()} CPU cores; jax {__import__("jax").__version__}, torch {torch.__version__}). One '
      f'training step = forward + backward + AdamW on a batch of {b} x {t} tokens; median of {steps} steps '
      'after 2 warm-up steps, both frameworks in one process. Model: the demo training config (`demo` preset: '
      f'dim {base.dim}, {base.n_layers} layers: {base.n_dense_layers} dense + {base.n_moe_layers} MoE, '
      f'{base.n_routed_experts} routed experts top-{base.n_activated_experts} in {base.n_expert_groups} groups, '
      f'vocab {base.vocab_size}, {cost.summary(no_mtp)["total_params"] / 1e6:.1f}M parameters without MTP; '
      f'layers {"scanned" if rt.scan_layers else "unrolled"}), random init and random tokens.',
      '',
      '| model | ours tokens/s | HF transformers tokens/s | speed-up |',
      '|---|---|---|---|',
      *rows,
      '',
      f'Step time as routed experts grow (top-{base.n_activated_experts}, expert width {base.moe_inter_dim}, '
      'no MTP; ratio to '
      f'{sweep[0][0]} experts):',
      '',
      '| routed experts | ours | HF transformers |',
      '|---|---|---|',
      *sweep_rows,
  ])
  print(text)
  replace_section('Training throughput', text)


if __name__ == '__main__':
  app.run(main)
