"""Device meshes and shardings: one table maps every parameter's logical axes onto mesh axes.

Mesh axes, outermost first:
  'pipeline'  pipeline stages: stacked layers split over it; the step runs a pipeline schedule (pipeline.py).
  'data'      data parallelism and FSDP: batches split over it, and every weight's model dimension ('embed')
              sharded over it, so XLA all-gathers a weight where it is used and reduce-scatters its gradient
              (ZeRO-3; optimizer moments follow their weights).
  'expert'    expert parallelism: each device holds n_routed_experts / size routed experts; everything else
              treats it as more data parallelism (batches and FSDP shards span data x expert), as DeepSeek-V3
              runs attention data-parallel across the devices its experts are spread over (paper §3.4).
Every parameter carries `logical_axes` metadata (layers.normal_param). `RULES` maps the structural names onto
their mesh axes ('expert' dimensions over 'expert', stacked layers over 'pipeline'); then FSDP hands each of
'data' and 'expert' that the array does not use yet to the first dimension, in FSDP_DIMS' order, that it
divides (several axes may share a dimension). An array above REPLICATED_LIMIT_BYTES that some FSDP axis could
not split raises ReplicatedError naming it, its shape and the mesh: on V3 a silently replicated head or
expert stack would not fit any device. ('pipeline' is not checked: the embedding, dense blocks, head and MTP
are the first stage's in DualPipe and stay whole over it; the MoE stack must divide, pipeline.py checks.)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('pipeline', 'data', 'expert')

RULES: Mapping[str, tuple[str, ...]] = {
    'batch': ('data', 'expert'),  # sequences over every non-pipeline device
    'expert': ('expert',),  # routed experts over 'expert' (expert_parallel.py dispatches to them)
    'layers': ('pipeline',),  # stacked blocks: each pipeline stage stores its own (pipeline.py)
}
# FSDP (ZeRO-3) spreads every weight over the data x expert devices that no rule above gave it: each of
# these axes goes to the first of the array's dimensions, in this order of preference, whose size the axes
# it already holds times this axis divide. So a model dimension that does not divide (V3's 7168 on 2048
# devices) leaves the axis to the next dimension (heads, vocabulary, expert width ...).
FSDP_AXES = ('data', 'expert')
FSDP_DIMS = ('embed', 'q_lora', 'kv_lora', 'moe_mlp', 'mlp', 'heads', 'vocab', 'mtp_concat', 'router')
# An array above this size that some FSDP axis still cannot split is an error (or, with allow_replicated, a
# warning): silently replicated, V3's head alone is 3.7 GB on every device. Norm scales and router biases
# (at most 2 MB each in V3) stay below it.
REPLICATED_LIMIT_BYTES = 16 * 2**20


class ReplicatedError(ValueError):
  """A large array that the mesh cannot split: every device would hold all of it."""


def _check_rules() -> None:
  """The table itself: known mesh axes, none twice in one rule, FSDP axes distinct."""
  for name, axes in {**RULES, 'FSDP': FSDP_AXES}.items():
    unknown = set(axes) - set(MESH_AXES)
    if unknown or len(set(axes)) != len(axes):
      raise ValueError(f'sharding rule {name!r} -> {axes}: mesh axes must be among {MESH_AXES}, each once')


_check_rules()


def make_mesh(data: int = -1, expert: int = 1, pipeline: int = 1, devices=None) -> Mesh:
  """A ('pipeline', 'data', 'expert') mesh over `devices` (default: all). One size may be -1 to fill them
  all; sizes without a -1 may take the first of more devices than they need (a debug run on one device)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {'pipeline': pipeline, 'data': data, 'expert': expert}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f'mesh.{name} must be a positive device count or -1 (fill), got {size}')
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f'only one mesh axis may be -1 (fill), got {fill}')
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if len(devices) % known:
      raise ValueError(f'mesh {sizes}: {len(devices)} devices do not divide by {known}')
    sizes[fill[0]] = len(devices) // known
  if math.prod(sizes.values()) > len(devices):
    raise ValueError(f'mesh {sizes} needs {math.prod(sizes.values())} devices, this run has {len(devices)}')
  devices = devices[:math.prod(sizes.values())]
  shape = tuple(sizes[name] for name in MESH_AXES)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def logical_spec(logical_axes, shape, mesh, name: str = 'array', itemsize: int = 4,
                 allow_replicated: bool = False) -> P:
  """The PartitionSpec of an array whose dimensions have these logical names (RULES, then FSDP_DIMS)."""
  if len(logical_axes) != len(shape):
    raise ValueError(f'{name}: logical axes {tuple(logical_axes)} do not match its shape {tuple(shape)}')
  parts: list[tuple[str, ...]] = [() for _ in shape]
  used: set[str] = set()
  for dim, (logical, size) in enumerate(zip(logical_axes, shape)):
    axes = tuple(a for a in RULES.get(logical, ()) if mesh.shape[a] > 1 and a not in used)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    parts[dim] = axes
    used.update(axes)
  order = sorted((d for d, logical in enumerate(logical_axes) if logical in FSDP_DIMS),
                 key=lambda d: FSDP_DIMS.index(logical_axes[d]))
  left = []
  for axis in FSDP_AXES:
    if mesh.shape[axis] == 1 or axis in used:
      continue
    for dim in order:
      if shape[dim] % (math.prod(mesh.shape[a] for a in parts[dim]) * mesh.shape[axis]) == 0:
        parts[dim] += (axis,)
        used.add(axis)
        break
    else:
      left.append(axis)
  nbytes = math.prod(shape) * itemsize
  if left and nbytes > REPLICATED_LIMIT_BYTES:
    message = (f'{name} {tuple(shape)} ({nbytes / 2**20:,.0f} MiB; dims {tuple(logical_axes)}) would be '
               f'replicated over mesh axes {left} of mesh {dict(mesh.shape)}: none of its dimensions divides by '
               'their size; choose mesh sizes that divide one of its dimensions')
    if not allow_replicated:
      raise ReplicatedError(message + ' (or allow replication explicitly)')
    logging.warning('%s', message)
  return P(*[(p[0] if len(p) == 1 else p) if p else None for p in parts])


def state_shardings(tree: Any, mesh, allow_replicated: bool = False) -> Any:
  """NamedShardings for a pytree of nnx Variables (params, router biases, optimizer moments: each from its
  `logical_axes`) and plain arrays (replicated), in the tree's own structure. `mesh` may be an AbstractMesh
  (V3-sized layouts checked without devices). allow_replicated: warn instead of raising ReplicatedError."""

  def one(path, leaf):
    if isinstance(leaf, nnx.Variable):
      axes = leaf.get_metadata().get('logical_axes')
      if not axes:
        return leaf.replace(NamedSharding(mesh, P()))
      name = jax.tree_util.keystr(path, simple=True, separator='/')
      spec = logical_spec(axes, leaf.shape, mesh, name, np.dtype(leaf.dtype).itemsize, allow_replicated)
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int, batch_size: int | None = None) -> NamedSharding:
  """Token arrays split along `batch_dim` over the 'batch' rule's mesh axes (replicated when a given
  batch_size does not divide: evaluation batches)."""
  parts = [None] * ndim
  if batch_size is None or batch_size % batch_devices(mesh) == 0:
    parts[batch_dim] = tuple(a for a in RULES['batch'] if mesh.shape[a] > 1) or None
  return NamedSharding(mesh, P(*parts))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_devices(mesh: Mesh) -> int:
  """How many ways a batch is split: a global batch must divide by it."""
  return math.prod(mesh.shape[a] for a in RULES['batch'])


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """Abstract arrays (jax.ShapeDtypeStruct) carrying the given shardings: what orbax restores onto."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
