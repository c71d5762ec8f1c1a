"""The training loop behind `launch/train.py`: data, model, resume, steps, evaluation, checkpoints, sample.

Rerunning the same command resumes from the newest readable checkpoint with the data iterator where it
stopped, so per-step losses match an uninterrupted run bit for bit on CPU. SIGTERM / SIGINT finish the
current step, save, and return (a TPU VM preemption notice becomes a clean exit). Metrics go to
WORKDIR/metrics.jsonl and TensorBoard; the run ends with a loss-curve PNG and a greedy sample.

Nothing of a run is lost (run_dir.py): one trainer holds a directory at a time; a rerun whose architecture or
data differ from the run's is refused before anything is written; an unreadable checkpoint is moved aside
and the run continues from the previous one; when none is readable the rerun is refused unless it asks
for a fresh start (overwrite=True), which moves the old run aside. A step whose loss, gradient or update is
not finite, or whose update is larger than the weights it changes, is skipped (train_step.py), so a saved
state is always one that trained normally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from deepseek_jax import data, run_dir, schedules, sharding
from deepseek_jax.checkpoint import Checkpointer, tree_mismatch
from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.hf import load_hf
from deepseek_jax.run_config import batch_ramp, init_source, model_config, runtime, schedule, validate
from deepseek_jax.generate import generate
from deepseek_jax.metrics import MetricsWriter, plot_loss_curve, read_metrics
from deepseek_jax.model import DeepSeekV3, moe_layer_ids
from deepseek_jax.optimizer import adamw
from deepseek_jax.router import RouterBias
from deepseek_jax.train_step import Hyper, TrainState, eval_step, init_train_state, train_step



@dataclasses.dataclass
class TrainResult:
  step: int
  preempted: bool
  val_loss: float | None
  sample: str | None


def train(config, workdir: str, overwrite: bool = False) -> TrainResult:
  """Trains (or resumes) the run in `workdir` as `config` describes. overwrite: start afresh, moving any
  earlier run in `workdir` aside to a sibling directory."""
  validate(config)
  cfg, rt = model_config(config), runtime(config)
  if rt.fp8_weights or rt.weights4 != 'none':
    held = 'fp8_weights holds weights as FP8' if rt.fp8_weights else f'weights4 holds experts as {rt.weights4}'
    raise ValueError(f'runtime.{held} codes for inference; training needs the fp32 master weights (set '
                     "runtime.quant='fp8' for the FP8 training recipe)")
  if config.seq_len > cfg.max_seq_len:
    raise ValueError(f'seq_len={config.seq_len} exceeds the model max_seq_len={cfg.max_seq_len}')
  resolved = schedule(config)
  mesh = sharding.make_mesh(**dict(config.mesh))
  _check_batching(config, sharding.batch_devices(mesh))
  workdir = os.path.abspath(workdir)  # orbax writes sharded arrays to absolute paths only
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0  # multi-host: process 0 writes the run's files, all write checkpoints
  with contextlib.ExitStack() as held:
    if primary:  # one writer per directory, for the whole run
      held.enter_context(run_dir.RunLock(workdir))
    return _train(config, workdir, overwrite, cfg, rt, resolved, mesh, primary, held)


def _train(config, workdir, overwrite, cfg, rt, resolved, mesh, primary, held: contextlib.ExitStack) -> TrainResult:
  record = {'data': data.identity(config.data)}
  if overwrite and primary and run_dir.has_run(workdir):
    logging.warning('--overwrite: the earlier run in %s moved to %s', workdir, run_dir.move_aside(workdir))
  _sync('run directory ready')
  fingerprint = data.fingerprint(config.data) if config.data.source != 'tokens' else None
  run_dir.check_compatible(workdir, cfg, record, fingerprint)  # before anything is written
  corpus = _prepare_data(config, workdir, primary)
  if corpus.vocab_size > cfg.vocab_size:
    raise ValueError(f'the tokenizer ({config.data.tokenizer_path or "data/tokenizer.json"}) has {corpus.vocab_size} '
                     f'tokens but the model vocab_size is {cfg.vocab_size}')
  pipeline = None
  if mesh.shape['pipeline'] > 1:
    pipeline = (mesh, config.pipeline_schedule)
    n_micro = config.batch_size // (config.microbatch_size or config.batch_size)
    if n_micro < mesh.shape['pipeline']:
      logging.warning('%d microbatch(es) through %d pipeline stages: mostly bubble; set microbatch_size to '
                      'batch_size / (a few x mesh.pipeline)', n_micro, mesh.shape['pipeline'])
  tx = adamw(**dict(config.optimizer))

  def fresh_state():
    return init_train_state(DeepSeekV3(cfg, rt, nnx.Rngs(config.seed)), tx)

  graphdef, abstract_state = nnx.eval_shape(fresh_state)
  shardings = sharding.state_shardings(abstract_state, mesh, config.allow_replicated)
  checkpoints = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints)
  held.callback(checkpoints.close)  # its async saves finish before the lock is released
  batches = data.BatchIterator(corpus.train, config.seq_len, config.seed)
  # Onto this mesh; unreadable checkpoints go to damaged_checkpoints/, so their steps are saved again.
  restored = checkpoints.restore(sharding.with_shardings(abstract_state, shardings),
                                 damaged_dir=os.path.join(workdir, run_dir.DAMAGED))
  if restored is None and run_dir.damaged_steps(workdir):  # a run was saved here, and none of it reads
    raise run_dir.RunDirError(
        f'no checkpoint of the run in {workdir} is readable (the damaged ones are in '
        f'{os.path.join(workdir, run_dir.DAMAGED)}); refusing to start it over. Pass --overwrite to start afresh '
        'here (the old run is moved aside, not deleted), or use another --workdir.')
  if primary:
    run_dir.record(workdir, cfg, record)  # what restore_model rebuilds the model from, and the next check
  if restored is None:
    step, tokens_seen = 0, 0
    if config.init_from:
      state = _pretrained_state(config.init_from, abstract_state, shardings, tx, rt, mesh, config.allow_replicated)
      logging.info('new run in %s from the weights of %s: %s', workdir, config.init_from, _size(cfg))
    else:
      state = jax.jit(lambda: fresh_state()[1], out_shardings=shardings)()  # each device builds its shards
      logging.info('new run in %s: %s', workdir, _size(cfg))
  else:
    step, state, meta = restored.step, restored.state, restored.meta
    tokens_seen = meta['tokens_seen']
    batches.restore(meta['data'])
    logging.info('resumed from step %d (%d tokens seen) in %s', step, tokens_seen, workdir)
  logging.info('%s', schedules.describe(resolved, config.batch_size * config.seq_len))

  replicated = sharding.replicated(mesh)
  step_fn = jax.jit(functools.partial(train_step, graphdef, tx, pipeline=pipeline,
                                      max_update_ratio=config.max_update_ratio),
                    out_shardings=(shardings, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, graphdef), out_shardings=replicated)
  sharding_NBS = sharding.batch_sharding(mesh, 3, 1)
  eval_BS = sharding.batch_sharding(mesh, 2, 0, config.eval_batch_size)
  val_batches = data.validation_batches(corpus.val, config.seq_len, config.eval_batch_size, config.eval_batches,
                                       cfg.vocab_size)
  metrics = MetricsWriter(workdir, resume_step=step, enabled=primary)
  stop = _StopRequest()
  meta = lambda: {'step': step, 'tokens_seen': tokens_seen, 'data': batches.state()}
  evaluate = lambda state: float(np.mean([float(eval_fn(state, data.host_batch(b, eval_BS))['ce'])
                                          for b in val_batches]))

  pending, val_loss = None, None
  clock = _Clock(step, config.steps)
  with contextlib.ExitStack() as cleanup:
    # Traced under the mesh: the MoE layers see its 'expert' axis and dispatch over it (expert_parallel.py).
    cleanup.enter_context(jax.set_mesh(mesh))
    for close in (stop.release, metrics.close):  # on the way out, last first
      cleanup.callback(close)
    while step < config.steps and not stop.requested:
      hyper, n_sequences = _hyper(config, resolved, tokens_seen)
      micro = config.microbatch_size or n_sequences
      indices_NB = batches.next_indices(n_sequences).reshape(n_sequences // micro, micro)
      tokens_NBS = data.global_batch(corpus.train, config.seq_len, indices_NB, sharding_NBS, cfg.vocab_size)
      state, step_metrics = step_fn(state, tokens_NBS, hyper)
      step, tokens_seen = step + 1, tokens_seen + n_sequences * config.seq_len
      # Read the previous step's metrics only now, so the host never waits for the step it just dispatched.
      if pending is not None:
        _record(metrics, clock, config, cfg, *pending)
      val_loss = evaluate(state) if step % config.eval_every == 0 or step == config.steps else None
      pending = (step, step_metrics, hyper.lr, n_sequences * config.seq_len, val_loss)
      if step % config.checkpoint_every == 0:
        checkpoints.save(step, state, meta())
    if pending is not None:
      _record(metrics, clock, config, cfg, *pending)
    if checkpoints.manager.latest_step() != step:
      checkpoints.save(step, state, meta())
    checkpoints.wait()
  if stop.requested:
    logging.info('stop requested (%s): saved step %d, exiting', stop.signal, step)
    return TrainResult(step, True, val_loss, None)
  val_loss = val_loss if val_loss is not None else evaluate(state)
  if not primary:
    return TrainResult(step, False, val_loss, None)
  plot_loss_curve({'': read_metrics(metrics.path)}, os.path.join(workdir, 'loss.png'))
  if jax.process_count() > 1:  # the state spans hosts; decode it with launch/decode.py
    return TrainResult(step, False, val_loss, None)
  sample = _sample(graphdef, state, corpus.tokenizer, config)
  with open(os.path.join(workdir, 'sample.txt'), 'w') as f:
    f.write(sample)
  return TrainResult(step, False, val_loss, sample)


def restore_model(workdir: str, rt: Runtime = Runtime(), mesh=None,
                  allow_replicated: bool = False) -> tuple[ModelConfig, DeepSeekV3, int]:
  """The model of a training run's newest readable checkpoint, run as `rt` says: (config, model, step).

  Only the weights and router biases are read (no optimizer state), each device reading its own shards of
  them in the sharding rules' layout on `mesh` (default: one device), whatever mesh trained the run."""
  workdir = os.path.abspath(workdir)  # orbax reads from absolute paths only
  cfg = run_dir.model_config(workdir)
  graphdef, params, bias = nnx.eval_shape(lambda: nnx.split(DeepSeekV3(cfg, rt, nnx.Rngs(0)), nnx.Param,
                                                            RouterBias))
  abstract = {'params': params, 'bias': bias}  # TrainState's fields, as the checkpoint names them
  mesh = mesh if mesh is not None else sharding.make_mesh(data=1)
  shardings = sharding.state_shardings(abstract, mesh, allow_replicated)
  checkpoints = Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:  # a reader: damaged checkpoints are skipped, not moved (a trainer may own the directory)
    restored = checkpoints.restore(sharding.with_shardings(abstract, shardings), partial=True)
  finally:
    checkpoints.close()
  if restored is None:
    raise FileNotFoundError(f'no readable checkpoint under {os.path.join(workdir, "checkpoints")}')
  if restored.skipped:
    logging.warning('restored step %d of %s: the newest readable checkpoint; skipped %s', restored.step, workdir,
                    '; '.join(restored.skipped))
  return cfg, nnx.merge(graphdef, restored.state['params'], restored.state['bias']), restored.step


def _pretrained_state(path: str, abstract: TrainState, shardings, tx, rt: Runtime, mesh,
                      allow_replicated: bool) -> TrainState:
  """A fresh train state holding config.init_from's weights, each streamed into its training sharding (a HF
  directory through load_hf, FP8 blocks dequantized into the master dtype; a run's newest checkpoint, weights
  only), with new optimizer moments."""
  if init_source(path)[0] == 'hf':
    _, model = load_hf(path, rt, mesh, allow_replicated)
  else:
    _, model, _ = restore_model(path, rt, mesh, allow_replicated)
  _, params, bias = nnx.split(model, nnx.Param, RouterBias)
  mismatch = tree_mismatch({'params': params, 'bias': bias}, {'params': abstract.params, 'bias': abstract.bias})
  if mismatch:  # a model override that changes a tensor's shape
    raise ValueError(f'config.init_from={path!r} holds other weights than this run builds: {mismatch}')
  params, bias = jax.device_put((params, bias), (shardings.params, shardings.bias))  # already there: no copy
  rest = jax.jit(lambda p: (tx.init(p), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)),
                 out_shardings=(shardings.opt_state, shardings.skipped, shardings.streak))(params)
  return TrainState(params, bias, *rest)


def _prepare_data(config, workdir: str, primary: bool) -> data.Corpus:
  """The corpus; with several processes, process 0 builds it first and the others then reuse its files (or
  build the same files on their own disks)."""
  directory = os.path.join(workdir, 'data')
  if jax.process_count() == 1:
    return data.prepare(config.data, directory)
  from jax.experimental import multihost_utils
  corpus = data.prepare(config.data, directory) if primary else None
  multihost_utils.sync_global_devices('data prepared')
  return corpus or data.prepare(config.data, directory)


def _check_batching(config, batch_devices: int) -> None:
  micro = config.microbatch_size
  sizes = [config.batch_size] + ([config.batch_ramp.start, config.batch_ramp.multiple] if config.get('batch_ramp')
                                 else [])
  if micro and any(size % micro for size in sizes):
    raise ValueError(f'microbatch_size={micro} must divide batch_size={config.batch_size} (and, with a ramp, '
                     'batch_ramp.start and batch_ramp.multiple)')
  if any(size % batch_devices for size in ([micro] if micro else sizes)):
    raise ValueError(f'the batch (batch_size={config.batch_size}, microbatch_size={micro}, batch_ramp) must divide '
                     f'by the mesh\'s data x expert = {batch_devices} devices')


def _hyper(config, resolved: schedules.Resolved, tokens_seen: int) -> tuple[Hyper, int]:
  ramp = batch_ramp(config)
  n = schedules.batch_size(tokens_seen, ramp) if ramp else config.batch_size
  hyper = Hyper(lr=jnp.float32(schedules.learning_rate(tokens_seen, resolved.lr)),
                gamma=jnp.float32(schedules.piecewise(tokens_seen, resolved.gamma)),
                mtp_lambda=jnp.float32(schedules.piecewise(tokens_seen, resolved.mtp_lambda)),
                balance_alpha=jnp.float32(config.balance_alpha))
  return hyper, n


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _record(metrics, clock, config, cfg: ModelConfig, step, step_metrics, lr, n_tokens, val_loss) -> None:
  values = jax.device_get(step_metrics)
  if not values['ok']:
    logging.warning('step %d skipped: loss %s, grad norm %s, update / weights norm %s (a step is kept when all are '
                    'finite and the update ratio is <= max_update_ratio=%s)', step, values['loss'], values['grad_norm'],
                    values['update_ratio'], config.max_update_ratio)
    if values['streak'] >= config.max_nonfinite_streak:  # TrainState.streak: it survives a restart
      raise FloatingPointError(
          f'{values["streak"]} consecutive steps skipped (last: step {step}) for a non-finite loss, gradient or '
          'update, or an update larger than max_update_ratio x the weights; skipped steps change no weights, so '
          'every saved checkpoint holds a state that trained normally. Lower config.lr.peak or look at the data.')
  # Per MoE layer, named by its layer id in the checkpoint (MTP depth k: layer n_layers + k).
  loads = {layer: float(ratio) for path, ratios in values.pop('load_max_over_mean').items()
           for layer, ratio in zip(moe_layer_ids(cfg, path), np.atleast_1d(ratios))}
  scalars = {**values, 'lr': float(lr)}
  scalars.update({f'load_max_over_mean/layer{layer}': loads[layer] for layer in sorted(loads)})
  if val_loss is not None:
    scalars['val_loss'] = val_loss
  scalars['step_seconds'] = clock.tick(n_tokens)
  metrics.write(step, scalars)
  if step % config.log_every == 0 or val_loss is not None or step == config.steps:
    load_text = ' '.join(f'{loads[layer]:.2f}' for layer in sorted(loads)) or '-'
    val_text = f' | val {val_loss:.4f}' if val_loss is not None else ''
    rate, eta = clock.report(step)
    logging.info('step %d/%d | loss %.4f (ce %.4f, mtp %.4f, balance %.2e)%s | %s tok/s | lr %.2e | grad norm %.3f'
                 ' | expert load max/mean %s | ETA %s', step, config.steps, values['loss'], values['ce'],
                 values['mtp'], values['balance'], val_text, rate, lr, values['grad_norm'], load_text, eta)


def _sample(graphdef, state: TrainState, tokenizer, config) -> str:
  model = nnx.merge(graphdef, state.params, state.bias)
  prompt = tokenizer.encode(config.sample_prompt).ids if tokenizer else [0]
  ids = prompt + generate(model, [prompt], config.sample_tokens).tokens[0]  # greedy, through the KV cache
  return tokenizer.decode(ids) if tokenizer else ' '.join(map(str, ids))


def _size(cfg: ModelConfig) -> str:
  from deepseek_jax import cost
  s = cost.summary(cfg)
  return (f'{s["total_params"] / 1e6:.2f}M parameters ({s["active_params"] / 1e6:.2f}M active per token) '
          f'+ {s["mtp_params"] / 1e6:.2f}M MTP')


class _Clock:
  """Seconds per recorded step, and tokens per second and ETA over each logging window."""

  def __init__(self, step: int, total: int):
    del step
    self.total = total
    self.window_start = self.previous = time.time()
    self.tokens = self.steps = 0

  def tick(self, n_tokens: int) -> float:
    """Counts a recorded step; returns the seconds since the previous one (~ one step's time)."""
    now = time.time()
    elapsed, self.previous = now - self.previous, now
    self.tokens += n_tokens
    self.steps += 1
    return elapsed

  def report(self, step: int) -> tuple[str, str]:
    """(tokens/s, ETA) over the window since the last report; starts a new window."""
    elapsed = max(time.time() - self.window_start, 1e-9)
    per_second = self.tokens / elapsed
    seconds = elapsed / max(self.steps, 1) * (self.total - step)
    self.tokens, self.steps, self.window_start = 0, 0, time.time()
    rate = f'{per_second / 1e3:.1f}k' if per_second >= 1e3 else f'{per_second:.0f}'
    return rate, f'{int(seconds // 60)}m{int(seconds % 60):02d}s'


class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.requested, self.signal = False, None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    del frame
    self.requested, self.signal = True, signal.Signals(signum).name

  def release(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
