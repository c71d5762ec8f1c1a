"""Pipeline-parallel gradients over the mesh's 'pipeline' axis, run from a schedule's lockstep timetable.

The MoE blocks are cut into the schedule's V chunks of equal depth; chunk c lives on device placement[c]
(1F1B: chunk d on device d; DualPipeV: chunks d and 2P - 1 - d). The first chunk also runs the embedding
and the dense blocks, the last chunk the final norm, output head, MTP modules and the loss, so under
DualPipeV the embedding, the head and MTP all sit on device 0, as in DeepSeek-V3 (paper §3.2.3). Those
non-pipelined weights are stored like any other (FSDP over data x expert) and reach every stage; their
gradients are summed over the stages.

Everything runs in one `jax.shard_map`, manual over every mesh axis: the weights enter gathered over data
x expert (ZeRO-1 within the step; routed experts stay split over 'expert'), each device works on its share
of every microbatch, and gradients are summed over the shards at the end. (Left to the partitioner, the
'data' axis put resharding collectives inside the per-device branches below, where devices taking
different branches waited for each other forever.) A `lax.scan` walks the timetable's ticks; at each tick
every device looks up its own row, runs at most one forward and one backward (a DualPipe F&B pair; both are
`lax.switch`es over off / middle / first / last chunk), then one `ppermute` down and one up carries
activations and input gradients to the neighbours; a chunk's successor on the same device (the V's turn)
is written locally. Inside the branches only the expert dispatch communicates, within expert groups, whose
devices always run the same branch. A backward recomputes its chunk's forward under `jax.vjp` from the
stored chunk input, so a held microbatch costs one [b, T, D] activation; buffer slots are reused by
liveness (1F1B: P per device, DualPipeV: 2P + 2, whatever the number of microbatches). W chunks of a
zero-bubble split are folded into their backward (XLA computes both gradients at once).

The result equals the microbatch-accumulated gradient of train_step (mean over microbatches) up to
summation order; expert counts are summed over the global batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax import loss
from deepseek_jax import pipeline_schedules as ps
from deepseek_jax.model import MOE_LAYERS, MOE_STATS, positions

OFF, MIDDLE, FIRST, LAST = range(4)  # branch of a forward / backward at a tick
NONE, DOWN, UP, LOCAL = range(4)  # where a chunk's output goes: to device d + 1, d - 1, or this device
FIELDS = ('f_branch', 'f_local', 'f_chunk', 'f_micro', 'f_act', 'f_send',
          'b_branch', 'b_local', 'b_micro', 'b_act', 'b_grad', 'b_send',
          'above_f_on', 'above_f_slot', 'above_b_on', 'above_b_slot',  # sent down by device d - 1
          'below_f_on', 'below_f_slot', 'below_b_on', 'below_b_slot',  # sent up by device d + 1
          'local_f_on', 'local_f_slot', 'local_b_on', 'local_b_slot')


class Plan(NamedTuple):
  schedule: ps.Schedule
  table: np.ndarray  # int32 [ticks, devices, len(FIELDS)]
  act_slots: int  # stored chunk inputs per device
  grad_slots: int  # received input gradients per device


@functools.lru_cache(maxsize=32)
def make_plan(name: str, n_devices: int, n_micro: int) -> Plan:
  """The timetable of schedule `name` as per-tick, per-device table rows, with buffer slots allocated."""
  if name not in ps.SCHEDULES:
    raise ValueError(f'pipeline schedule must be one of {sorted(ps.SCHEDULES)}, got {name!r}')
  schedule = ps.SCHEDULES[name](n_devices, n_micro)
  ticks = ps.timetable(schedule)
  v, where = schedule.n_chunks, schedule.placement
  local = {c: schedule.local_chunks(where[c]).index(c) for c in range(v)}
  ran = {}  # (kind F|B, chunk, micro) -> tick
  for t, row in enumerate(ticks):
    for slot in row:
      for op in slot or ():
        if op.kind != 'W':
          ran['F' if op.kind == 'F' else 'B', op.chunk, op.micro] = t
  # Buffer lifetimes: a chunk input from the tick its producer ran to its backward, a gradient likewise.
  act_live = {(c, m): (ran['F', c - 1, m], ran['B', c, m]) for c in range(1, v) for m in range(n_micro)}
  grad_live = {(c, m): (ran['B', c + 1, m], ran['B', c, m]) for c in range(v - 1) for m in range(n_micro)}
  act_slot, act_slots = _allocate(act_live, where)
  grad_slot, grad_slots = _allocate(grad_live, where)

  def send(src: int, dst: int) -> int:
    return NONE if dst < 0 or dst >= v else LOCAL if where[dst] == where[src] else (
        DOWN if where[dst] == where[src] + 1 else UP)

  table = np.zeros((len(ticks), n_devices, len(FIELDS)), np.int32)
  for t, row in enumerate(ticks):
    for d, slot in enumerate(row):
      cell = dict.fromkeys(FIELDS, 0)
      for op in slot or ():
        c, m = op.chunk, op.micro
        branch = FIRST if c == 0 else LAST if c == v - 1 else MIDDLE
        if op.kind == 'F':
          cell.update(f_branch=branch, f_local=local[c], f_chunk=c, f_micro=m, f_act=act_slot.get((c, m), 0),
                      f_send=send(c, c + 1))
          receiver, kind, buffer_slot, direction = c + 1, 'f', act_slot.get((c + 1, m)), send(c, c + 1)
        elif op.kind in 'BI':
          cell.update(b_branch=branch, b_local=local[c], b_micro=m, b_act=act_slot.get((c, m), 0),
                      b_grad=grad_slot.get((c, m), 0), b_send=send(c, c - 1))
          receiver, kind, buffer_slot, direction = c - 1, 'b', grad_slot.get((c - 1, m)), send(c, c - 1)
        else:
          continue  # W: computed with its backward
        if direction == NONE:
          continue
        if direction == LOCAL:
          cell[f'local_{kind}_on'], cell[f'local_{kind}_slot'] = 1, buffer_slot
        else:
          side = 'above' if direction == DOWN else 'below'
          table[t, where[receiver], FIELDS.index(f'{side}_{kind}_on')] = 1
          table[t, where[receiver], FIELDS.index(f'{side}_{kind}_slot')] = buffer_slot
      for field, value in cell.items():
        if value:  # a receiver's fields may already be set by its neighbours' sends
          table[t, d, FIELDS.index(field)] = value
  return Plan(schedule, table, max(act_slots, 1), max(grad_slots, 1))


def _allocate(live: dict, where) -> tuple[dict, int]:
  """Buffer slot per (chunk, micro): the fewest slots on each device such that lifetimes [write, read]
  sharing a slot do not overlap (interval colouring, earliest write first)."""
  slots, most = {}, 0
  free_at: dict[int, list[int]] = {}  # device -> tick after which each slot is free
  for key, (start, end) in sorted(live.items(), key=lambda item: item[1]):
    ends = free_at.setdefault(where[key[0]], [])
    slot = next((i for i, last in enumerate(ends) if last < start), len(ends))
    if slot == len(ends):
      ends.append(end)
    else:
      ends[slot] = end
    slots[key] = slot
    most = max(most, len(ends))
  return slots, most


def _expert_specs(state: nnx.State, ep: int, layers: bool):
  """PartitionSpecs (one per array) splitting only the routed-expert dimension over 'expert'; stacked layer
  arrays lose their leading 'layers' name (the pipeline stores them by chunk)."""
  def spec(variable):
    axes = tuple(variable.get_metadata().get('logical_axes') or ())[1 if layers else 0:]
    shape = variable.shape[1 if layers else 0:]
    return P(*('expert' if name == 'expert' and ep > 1 and size % ep == 0 else None
               for name, size in zip(axes, shape)))
  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _split(state: nnx.State):
  """(the MoE stack's sub-state, the rest) of a params or router-bias state."""
  moe = state[MOE_LAYERS] if MOE_LAYERS in state else None
  return moe, nnx.State({k: v for k, v in state.items() if k != MOE_LAYERS})


def _join(rest: nnx.State, moe, like: nnx.State) -> nnx.State:
  return nnx.State({k: (moe if k == MOE_LAYERS else rest[k]) for k in like.keys()})


class ChunkOut(NamedTuple):
  """A chunk's forward. counts: expert counts by MoE layer path, this chunk's MoE layers [layers per
  chunk, E] and the MTP blocks' [E] (from the last chunk; zeros from the others)."""
  x_BTD: jax.Array  # the next chunk's input (zeros from the last chunk)
  terms: jax.Array  # [3]: this chunk's shares of the microbatch's ce, mtp and balance terms (their sum: its loss)
  counts: dict


def pipeline_grads(graphdef, params: nnx.State, bias: nnx.State, tokens_NBS, hyper, mesh,
                   schedule: str) -> tuple[nnx.State, loss.LossTerms]:
  """Mean over the N microbatches of the loss gradient, and the loss terms, pipelined over mesh 'pipeline'."""
  n_devices, n_micro = mesh.shape['pipeline'], tokens_NBS.shape[0]
  plan = make_plan(schedule, n_devices, n_micro)
  v = plan.schedule.n_chunks
  moe_p, rest_p = _split(params)
  moe_b, rest_b = _split(bias)
  moe_b = nnx.State({}) if moe_b is None else moe_b  # models without a router bias
  if moe_p is None:
    raise ValueError('pipeline parallelism cuts the MoE blocks into chunks; this model has none')
  n_layers = jax.tree.leaves(moe_p)[0].shape[0]
  if n_layers % v:
    raise ValueError(f'mesh.pipeline={n_devices} with the {schedule} schedule cuts the MoE blocks into {v} chunks; '
                     f'n_moe_layers={n_layers} does not divide by {v}')
  per_chunk, n_local = n_layers // v, v // n_devices
  order = np.asarray([c for d in range(n_devices) for c in plan.schedule.local_chunks(d)])
  identity = bool((order == np.arange(v)).all())

  def to_devices(a):  # [L, ...] -> [P, local chunks, layers per chunk, ...] in each device's storage order
    a = a.reshape(v, per_chunk, *a.shape[1:])
    return (a if identity else a[order]).reshape(n_devices, n_local, per_chunk, *a.shape[2:])

  def from_devices(a):
    a = a.reshape(v, per_chunk, *a.shape[3:])
    return (a if identity else a[np.argsort(order)]).reshape(n_layers, *a.shape[2:])

  abstract = nnx.merge(graphdef, params, bias)  # no compute: only to read the configs
  cfg, rt = abstract.cfg, abstract.rt
  # The expert counts the step returns, by MoE layer path (the whole model's, as loss_fn gives them).
  count_shapes = jax.eval_shape(lambda p, b, t: loss.loss_fn(nnx.merge(graphdef, p, b), t).expert_counts,
                                params, bias, tokens_NBS[0])
  n_shards = mesh.shape['data'] * mesh.shape['expert']  # each device's share of a microbatch
  ep = mesh.shape['expert']
  b, s = tokens_NBS.shape[1:]
  if b % n_shards:
    raise ValueError(f'microbatch size {b} does not divide by the mesh\'s data x expert = {n_shards} devices')
  x_shape = jax.ShapeDtypeStruct((b // n_shards, s - 1, cfg.dim), rt.jnp_dtype)
  inv_micro = 1.0 / n_micro

  def chunk_counts(counts: dict) -> dict:
    """This chunk's counts in the step's keys: zeros for the layers it does not run."""
    def shape(path):
      return (per_chunk, cfg.n_routed_experts) if path == MOE_STATS else count_shapes[path].shape
    return {path: counts.get(path, jnp.zeros(shape(path), jnp.int32)) for path in count_shapes}

  def chunk(branch: int, chunk_p, chunk_b, rest_p, rest_b, x_BTD, tokens_BS, hyper) -> ChunkOut:
    model = nnx.merge(graphdef, _join(rest_p, chunk_p, params), _join(rest_b, chunk_b, bias))
    inputs_BT, targets_BT = tokens_BS[:, :-1], tokens_BS[:, 1:]
    positions_BT = positions(inputs_BT)
    if branch == FIRST:
      x_BTD, _ = model.stem(inputs_BT, positions_BT)
    x_BTD, stats, _ = model.moe_blocks(x_BTD, positions_BT)
    if branch != LAST:
      zero = jnp.zeros((), jnp.float32)
      balance = loss.balance(stats, hyper.balance_alpha)
      counts = chunk_counts({path: s.counts_E for path, s in stats.items()})
      return ChunkOut(x_BTD, jnp.stack([zero, zero, balance]), counts)
    terms = loss.output_terms(model, model.outputs(x_BTD, stats), targets_BT, hyper.mtp_lambda,
                              hyper.balance_alpha)
    return ChunkOut(jnp.zeros_like(x_BTD), jnp.stack([terms.ce, terms.mtp, terms.balance]),
                    chunk_counts(terms.expert_counts))

  def local(moe_p, moe_b, rest_p, rest_b, tokens_NBS, hyper, table):
    moe_p, moe_b = jax.tree.map(lambda a: a[0], (moe_p, moe_b))  # [local chunks, layers per chunk, ...]
    rows = table[:, jax.lax.axis_index('pipeline')]  # this device's [ticks, fields]
    take = lambda tree, j: jax.tree.map(lambda a: a[j], tree)
    zeros_x = jnp.zeros(x_shape.shape, x_shape.dtype)
    off = ChunkOut(zeros_x, jnp.zeros((3,), jnp.float32), chunk_counts({}))

    def forward(branch):
      if branch == OFF:
        return lambda *_: off
      return lambda j, x_BTD, tokens_BS: chunk(branch, take(moe_p, j), take(moe_b, j), rest_p, rest_b, x_BTD,
                                               tokens_BS, hyper)

    def backward(branch):
      zero_grads = (jax.tree.map(jnp.zeros_like, take(moe_p, 0)), jax.tree.map(jnp.zeros_like, rest_p), zeros_x)
      if branch == OFF:
        return lambda *_: zero_grads

      def run(j, x_BTD, g_BTD, tokens_BS):
        def objective(chunk_p, rest_p, x_BTD):
          out = chunk(branch, chunk_p, take(moe_b, j), rest_p, rest_b, x_BTD, tokens_BS, hyper)
          return out.x_BTD, out.terms.sum()

        _, vjp = jax.vjp(objective, take(moe_p, j), rest_p, x_BTD)
        return vjp((g_BTD if branch != LAST else zeros_x, jnp.float32(inv_micro)))

      return run

    def tick(carry, row):
      acts, grads_in, g_moe, g_rest, terms, counts = carry
      f = dict(zip(FIELDS, row))
      out = jax.lax.switch(f['f_branch'], [forward(k) for k in range(4)], f['f_local'], acts[f['f_act']],
                           tokens_NBS[f['f_micro']])
      d_chunk, d_rest, d_x = jax.lax.switch(f['b_branch'], [backward(k) for k in range(4)], f['b_local'],
                                            acts[f['b_act']], grads_in[f['b_grad']], tokens_NBS[f['b_micro']])
      g_moe = jax.tree.map(lambda g, d: g.at[f['b_local']].add(d), g_moe, d_chunk)
      g_rest = jax.tree.map(jnp.add, g_rest, d_rest)
      terms = terms + out.terms * inv_micro
      start = f['f_chunk'] * per_chunk
      counts = {path: (jax.lax.dynamic_update_slice_in_dim(
          total, jax.lax.dynamic_slice_in_dim(total, start, per_chunk) + out.counts[path], start, 0)
                       if path == MOE_STATS else total + out.counts[path]) for path, total in counts.items()}
      # Activations and input gradients to the neighbours.
      pick = lambda send, x: jnp.where(send, x, jnp.zeros_like(x))
      down = jnp.stack([pick(f['f_send'] == DOWN, out.x_BTD), pick(f['b_send'] == DOWN, d_x)])
      up = jnp.stack([pick(f['f_send'] == UP, out.x_BTD), pick(f['b_send'] == UP, d_x)])
      from_above = jax.lax.ppermute(down, 'pipeline', [(i, i + 1) for i in range(n_devices - 1)])
      from_below = jax.lax.ppermute(up, 'pipeline', [(i + 1, i) for i in range(n_devices - 1)])
      write = lambda buffer, on, slot, x: buffer.at[slot].set(jnp.where(on, x, buffer[slot]))
      acts = write(acts, f['above_f_on'], f['above_f_slot'], from_above[0])
      acts = write(acts, f['below_f_on'], f['below_f_slot'], from_below[0])
      acts = write(acts, f['local_f_on'], f['local_f_slot'], out.x_BTD)
      grads_in = write(grads_in, f['above_b_on'], f['above_b_slot'], from_above[1])
      grads_in = write(grads_in, f['below_b_on'], f['below_b_slot'], from_below[1])
      grads_in = write(grads_in, f['local_b_on'], f['local_b_slot'], d_x)
      return (acts, grads_in, g_moe, g_rest, terms, counts), None

    carry = (jnp.zeros((plan.act_slots,) + x_shape.shape, x_shape.dtype),
             jnp.zeros((plan.grad_slots,) + x_shape.shape, x_shape.dtype),
             jax.tree.map(jnp.zeros_like, moe_p), jax.tree.map(jnp.zeros_like, rest_p),
             jnp.zeros((3,), jnp.float32), {path: jnp.zeros(s.shape, jnp.int32) for path, s in count_shapes.items()})
    (_, _, g_moe, g_rest, terms, counts), _ = jax.lax.scan(tick, carry, rows)
    # Each device differentiated the mean loss of its batch shard: sum the shards' gradients and divide.
    # Routed-expert weights already hold their whole expert group's gradient (the dispatch's all-gather
    # transposes to a reduce-scatter), so they sum over 'data' only.
    def reduce(grads, specs, axes):
      return jax.tree.map(
          lambda g, spec: jax.tree.map(lambda a: jax.lax.psum(a, tuple(x for x in axes if x not in spec)) / n_shards, g),
          grads, specs, is_leaf=lambda x: isinstance(x, nnx.Variable))

    g_moe = reduce(g_moe, moe_specs, ('data', 'expert'))
    g_rest = reduce(g_rest, rest_specs, ('pipeline', 'data', 'expert'))
    terms = jax.lax.psum(terms, tuple(mesh.axis_names)) / n_shards
    counts = jax.lax.psum(counts, tuple(mesh.axis_names))
    return jax.tree.map(lambda a: a[None], g_moe), g_rest, terms, counts

  stored = jax.tree.map(to_devices, (moe_p, moe_b))
  # Manual over every mesh axis (module docstring): weights whole but for the routed experts' 'expert' split.
  moe_specs, rest_specs = _expert_specs(moe_p, ep, layers=True), _expert_specs(rest_p, ep, layers=False)
  stored_specs = jax.tree.map(lambda spec: P('pipeline', None, None, *spec), moe_specs)  # [P, chunks, layers, ...]
  bias_specs = jax.tree.map(lambda _: P('pipeline'), stored[1])
  tokens_spec = P(None, ('data', 'expert'))
  g_moe, g_rest, terms, counts = jax.shard_map(
      local, mesh=mesh, in_specs=(stored_specs, bias_specs, rest_specs, P(), tokens_spec, P(), P()),
      out_specs=(stored_specs, rest_specs, P(), P()), axis_names=set(mesh.axis_names), check_vma=False,
  )(*stored, rest_p, rest_b, tokens_NBS, hyper, jnp.asarray(plan.table))
  # Back in the params' own tree types (nnx.State nodes come back as dicts; same leaves in the same order).
  joined = _join(g_rest, jax.tree.map(from_devices, g_moe), params)
  grads = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(joined))
  ce, mtp, balance = terms[0], terms[1], terms[2]
  return grads, loss.LossTerms(ce + mtp + balance, ce, mtp, balance, counts)
