r"""Training step time and per-device memory of the demo model across meshes of 8 CPU devices, and the
pipeline bubble of each schedule.

  python bench/scaling.py [--steps=5 --batch_size=32 --microbatches=4]

One process splits the CPU into 8 devices (two cores run them all, so step times show the cost of the
sharded program and its collectives, not a speed-up). Per-device bytes: the parameters, router biases and
AdamW moments each device holds, and XLA's compiled temporaries for one step. Writes the "Scaling (CPU
meshes)" section of docs/benchmarks.md.
"""

import functools
import os
import statistics
import sys
import time

import jax

jax.config.update('jax_num_cpu_devices', 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import replace_section  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per mesh (median reported) after one warm-up step.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Sequences per step (divisible by 8 x microbatches).')
_MICRO = flags.DEFINE_integer('microbatches', 4, 'Microbatches per step: accumulated, or pipelined.')
# (data, expert, pipeline, schedule); (1, 1, 1) runs on one device.
MESHES = ((1, 1, 1, None), (8, 1, 1, None), (4, 2, 1, None), (2, 4, 1, None), (1, 8, 1, None),
          (4, 1, 2, '1f1b'), (2, 2, 2, '1f1b'), (2, 2, 2, 'dualpipev'), (2, 1, 4, '1f1b'))


def main(argv):
  del argv
  from configs import demo
  from deepseek_jax import sharding
  from deepseek_jax.model import DeepSeekV3
  from deepseek_jax.optimizer import adamw
  from deepseek_jax.train_step import Hyper, init_train_state, train_step
  from deepseek_jax.run_config import model_config, runtime
  config = demo.get_config()
  demo_cfg, rt = model_config(config), runtime(config)
  cfg = demo_cfg.replace(n_layers=demo_cfg.n_dense_layers + 4)  # 4 MoE blocks: 2 or 4 stages, a 4-chunk V
  tx = adamw(**dict(config.optimizer))
  graphdef, abstract = nnx.eval_shape(lambda: init_train_state(DeepSeekV3(cfg, rt, nnx.Rngs(0)), tx))
  n_micro = _MICRO.value
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (n_micro, _BATCH.value // n_micro,
                                                                  config.seq_len + 1))
  hyper = Hyper(*(jnp.float32(v) for v in (1e-3, 1e-3, 0.3, 1e-4)))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  rows, base = [], None
  for data, expert, stages, schedule in MESHES:
    mesh = sharding.make_mesh(data=data, expert=expert, pipeline=stages)
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.jit(lambda: init_train_state(DeepSeekV3(cfg, rt, nnx.Rngs(0)), tx)[1], out_shardings=shardings)()
    batch = jax.device_put(tokens, sharding.batch_sharding(mesh, 3, 1))
    pipeline = (mesh, schedule) if schedule else None
    step = jax.jit(functools.partial(train_step, graphdef, tx, pipeline=pipeline),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    with jax.set_mesh(mesh):  # as the trainer runs: explicit expert-parallel dispatch on expert meshes
      state, seconds, held, temp, metrics = _measure(step, state, batch, hyper, mesh)
    base = base or seconds
    rows.append(f'| {data} x {expert} x {stages} | {schedule or "-"} | {seconds * 1e3:,.0f} | {seconds / base:.2f}x | '
                f'{max(held) / 2**20:.1f} | {max(held) / total:.3f} | {temp / 2**20:.0f} | '
                f'{float(metrics["loss"]):.6f} |')

  from deepseek_jax import pipeline_schedules as ps
  bubble_rows = []
  for stages in (4, 8, 16):
    for micro in (2 * stages, 8 * stages):
      cells = []
      for name, costs in (('1f1b', {'F': 2.0, 'B': 4.0, 'W': 0.0}),  # a stage = 2 chunks of the V
                          ('dualpipev', {'F': 1.0, 'B': 2.0, 'W': 0.0}),
                          ('dualpipev', {'F': 1.0, 'B': 2.0, 'W': 0.5, 'F&B': 2.5})):
        orders = ps.SCHEDULES[name](stages, micro)
        _, idle = ps.simulate(orders, costs)
        formula = (stages - 1) * ((costs['F'] + costs['B']) if name == '1f1b' else
                                  (costs.get('F&B', costs['F'] + costs['B']) + costs['B'] - 3 * costs['W']))
        cells.append(f'{max(idle):g} / {formula:g} ({ps.bubble_fraction(orders, costs):.3f})')
      table = ps.timetable(ps.dualpipe_v(stages, micro))
      bubble_rows.append(f'| {stages} | {micro} | ' + ' | '.join(cells) +
                         f' | {len(ps.timetable(ps.one_f_one_b(stages, micro)))} / {len(table)} |')
  text = '\n'.join([
      f'Command: `python bench/scaling.py --steps={_STEPS.value} --batch_size={_BATCH.value} '
      f'--microbatches={n_micro}` (one process, the {os.cpu_count()}-core CPU split into {jax.device_count()} '
      f'devices, jax {jax.__version__}). The demo model with {cfg.n_moe_layers} MoE blocks instead of '
      f'{demo_cfg.n_moe_layers} (so that 2 and 4 stages and a 4-chunk V divide them; fp32 '
      f'master weights, bf16 AdamW moments: {total / 2**20:.1f} MiB of training state), {_BATCH.value} x '
      f'{config.seq_len} tokens per step in {n_micro} microbatches (accumulated, or pipelined); median step time '
      'of the timed steps after a warm-up. "State / device" is the largest share any device holds of the '
      'parameters, router biases and moments; "of total" divides it by the whole state; "temporaries" is '
      'XLA\'s compiled scratch per device for one step; the loss is the last timed step\'s, computed after '
      f'{_STEPS.value} updates (one warm-up step, then the timed ones; meshes differ only in summation order).',
      '',
      '| data x expert x pipeline | schedule | step ms | vs 1 device | state / device MiB | of total | '
      'temporaries MiB | loss |',
      '|---|---|---|---|---|---|---|---|',
      *rows,
      '',
      f'{jax.device_count()} devices on {os.cpu_count()} cores cannot be faster than one: the step times show '
      'what sharding costs here '
      '(collectives, smaller per-device kernels, and for the pipelines every bubble tick and the recomputed '
      'forward of each backward), and the memory columns show FSDP, expert and stage sharding dividing the '
      'state. Expert meshes run the explicit all-gather / reduce-scatter dispatch (expert_parallel.py). Inside '
      'a pipelined step the weights are gathered over data x expert once per step (ZeRO-1 style), so the '
      'temporaries of the pipelined meshes include one stage\'s whole weights.',
      '',
      'Pipeline bubbles from `pipeline_schedules.simulate` (each device starts a slot as soon as it is free and '
      'its inputs are done), with the backward twice the forward: the most idle device\'s waiting time / the '
      'published formula (bubble fraction of device-time). 1F1B in stage times (F = 2, B = 4: a stage is two '
      'V chunks), formula (P - 1)(F + B); DualPipeV in chunk times (F = 1, B = 2), formula '
      '(PP/2 - 1)(F&B + B - 3W), first without weight-gradient split or overlap (W = 0, F&B = F + B), then '
      'with W = 0.5 and an overlapped pair F&B = 2.5. Last column: lockstep ticks of the SPMD engine, 1F1B / '
      'DualPipeV.',
      '',
      '| stages P | microbatches M | 1F1B | DualPipeV W=0 | DualPipeV W=0.5, F&B=2.5 | ticks |',
      '|---|---|---|---|---|---|',
      *bubble_rows,
  ])
  print(text)
  replace_section('Scaling (CPU meshes)', text)


def _measure(step, state, batch, hyper, mesh):
  """(state, median step seconds, state bytes per device, compiled temporaries, last metrics)."""
  compiled = step.lower(state, batch, hyper).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes if compiled.memory_analysis() else float('nan')
  held = [0] * mesh.devices.size
  devices = list(mesh.devices.flat)
  for array in jax.tree.leaves(state):
    for shard in array.addressable_shards:
      held[devices.index(shard.device)] += shard.data.nbytes
  state, metrics = step(state, batch, hyper)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = step(state, batch, hyper)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, statistics.median(times), held, temp, metrics


if __name__ == '__main__':
  app.run(main)
