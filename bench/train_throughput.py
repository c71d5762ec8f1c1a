r"""Training throughput: our jitted train step against transformers' DeepseekV3ForCausalLM
forward + backward + torch AdamW, same shapes and batch, both timed in this one process (median of several
steps after warm-up); then our step time as the number of routed experts grows at fixed top-k and expert size
(the CPU's default host grouped GEMM and the row-tiled one), and the FLOPs of one MoE layer's routed experts
against the dropless ideal from 8 to 256 experts.

  python bench/train_throughput.py [--batch=16 --seq=128 --steps=5]

Writes its table into docs/benchmarks.md (section "Training throughput").
"""

import dataclasses
import functools
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402
from bench.timing import median_step_seconds  # noqa: E402

_BATCH = flags.DEFINE_integer('batch', 16, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per sequence.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (median reported) after 2 warm-up steps.')
_EXPERTS = flags.DEFINE_list('experts', ['8', '16', '32', '64'], 'Routed expert counts for the scaling sweep.')
_FLOPS_EXPERTS = flags.DEFINE_list('flops_experts', ['8', '16', '32', '64', '256'],
                                   'Routed expert counts for the MoE FLOPs table.')


def ours(cfg, rt, tokens):
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

  return run


def moe_flops(cfg, rt, n_tokens: int) -> tuple[float, float]:
  """(XLA's compiled FLOPs, the FLOPs the host callbacks ran) of one MoE layer's routed experts,
  forward + backward (gradients of the input, the gate weights and the three expert stacks), on one real
  execution with uniformly random top-k routing."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from deepseek_jax import host_gmm
  from deepseek_jax.moe import RoutedExperts

  graphdef, params = nnx.split(RoutedExperts(cfg, rt, nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  k = cfg.n_activated_experts
  x_XD = jnp.asarray(rng.standard_normal((n_tokens, cfg.dim), np.float32))
  experts_XK = jnp.asarray(np.argsort(rng.random((n_tokens, cfg.n_routed_experts)), axis=1)[:, :k], jnp.int32)
  weights_XK = jnp.asarray(rng.random((n_tokens, k), np.float32))
  loss = lambda p, x, w: jnp.sum(nnx.merge(graphdef, p)(x, experts_XK, w) ** 2)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  compiled = grad.lower(params, x_XD, weights_XK).compile().cost_analysis()['flops']
  with host_gmm.counting_multiply_adds() as counted:
    jax.block_until_ready(grad(params, x_XD, weights_XK))
  return compiled, 2 * counted[0]


def hf(cfg, tokens):
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

  return run


def main(argv):
  del argv
  import numpy as np
  import torch
  from configs import demo
  from deepseek_jax import cost
  from deepseek_jax import grouped_matmul as gm
  from deepseek_jax.run_config import model_config, runtime

  base, rt = model_config(demo.get_config()), runtime(demo.get_config())  # the demo training run's model
  b, t, steps = _BATCH.value, _SEQ.value, _STEPS.value
  tokens = np.random.default_rng(0).integers(0, base.vocab_size, (b, t + 1)).astype(np.int32)
  n_tokens = b * t
  rows = []
  no_mtp = base.replace(n_mtp_layers=0)
  timed = median_step_seconds({'ours': ours(no_mtp, rt, tokens), 'hf': hf(no_mtp, tokens),
                                'ours_mtp': ours(base, rt, tokens)}, steps)
  ours_s, hf_s, ours_mtp_s = timed['ours'], timed['hf'], timed['ours_mtp']
  rows.append(f'| demo shapes, no MTP (like for like) | {n_tokens / ours_s:,.0f} | {n_tokens / hf_s:,.0f} | '
              f'{hf_s / ours_s:.2f}x |')
  rows.append(f'| demo shapes, with the MTP module (ours only) | {n_tokens / ours_mtp_s:,.0f} | - | - |')
  tiled_rt = dataclasses.replace(rt, gmm_impl='tiled')
  impl = gm.resolve(rt.gmm_impl, n_tokens, base.n_activated_experts, base.n_routed_experts)
  runs = {}
  for e in map(int, _EXPERTS.value):
    cfg = no_mtp.replace(n_routed_experts=e)
    runs.update({(e, 'ours'): ours(cfg, rt, tokens), (e, 'tiled'): ours(cfg, tiled_rt, tokens),
                 (e, 'hf'): hf(cfg, tokens)})
  timed = median_step_seconds(runs, steps)
  sweep = [(e, *(timed[e, name] for name in ('ours', 'tiled', 'hf'))) for e in map(int, _EXPERTS.value)]
  first = sweep[0][1:]
  sweep_rows = ['| ' + ' | '.join([str(e)] + [f'{s * 1e3:.0f} ms ({s / s0:.2f}x)' for s, s0 in zip(times, first)])
                + ' |' for e, *times in sweep]
  # Dropless ideal of the routed experts, forward + backward: 3 weights x (1 forward + 2 backward GEMMs) x
  # 2 M D I FLOPs, M = tokens x top-k copies.
  m = n_tokens * base.n_activated_experts
  ideal = 3 * 3 * 2 * m * base.dim * base.moe_inter_dim
  flops_rows = []
  for e in map(int, _FLOPS_EXPERTS.value):
    cfg = no_mtp.replace(n_routed_experts=e)
    (ours_xla, ours_counted), (tiled, _) = moe_flops(cfg, rt, n_tokens), moe_flops(cfg, tiled_rt, n_tokens)
    flops_rows.append(f'| {e} | {ours_xla / 1e9:.2f} + {ours_counted / 1e9:.2f} = '
                      f'{(ours_xla + ours_counted) / ideal:.2f}x | {tiled / ideal:.2f}x |')
  text = '\n'.join([
      f'Command: `python bench/train_throughput.py --batch={b} --seq={t} --steps={steps}` on this machine '
      f'({os.cpu_count()} CPU cores; jax {__import__("jax").__version__}, torch {torch.__version__}). One '
      f'training step = forward + backward + AdamW on a batch of {b} x {t} tokens; median of {steps} steps '
      'after 2 warm-up steps, both frameworks in one process, the steps of each table timed in turn, each after '
      '0.5 s idle (bench/timing.py: PyTorch\'s threads spin after its ops). Model: '
      'the demo training config (`demo` preset: '
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
      f'no MTP; ratio to {sweep[0][0]} experts). "ours" is the default dispatch on this backend (`{impl}`); '
      '"tiled" is the row-tiled grouped matmul it replaced on CPU (still the GPU path and the FP8 recipe\'s):',
      '',
      '| routed experts | ours | ours, tiled | HF transformers |',
      '|---|---|---|---|',
      *sweep_rows,
      '',
      f'FLOPs of one MoE layer\'s routed experts, forward + backward, at these shapes ({m:,} routed copies, '
      f'dim {base.dim}, expert width {base.moe_inter_dim}), against the dropless ideal 18 M D I = '
      f'{ideal / 1e9:.2f} GFLOP. {impl}: XLA\'s compiled FLOPs (gather, SwiGLU, combine) + the GEMM FLOPs the '
      'host callbacks ran, counted from the operands of every product in one execution (XLA\'s cost analysis '
      'does not see inside a callback); tiled: XLA\'s compiled FLOPs:',
      '',
      f'| routed experts | {impl} GFLOP (XLA + callbacks = x ideal) | tiled (x ideal) |',
      '|---|---|---|',
      *flops_rows,
  ])
  print(text)
  replace_section('Training throughput', text)


if __name__ == '__main__':
  app.run(main)
