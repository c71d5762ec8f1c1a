"""Device meshes and shardings: one table maps every parameter's logical axes onto mesh axes.

Mesh axes, outermost first:
  'pipeline'  pipeline stages: stacked layers split over it; the step runs a pipeline schedule (pipeline.py).
  'data'      data parallelism and FSDP: batches split over it, and every weight's model dimension ('embed')
              sharded over it, so XLA all-gathers a weight where it is used and reduce-scatters its gradient
              (ZeRO-3; optimizer moments follow their weights).
  'expert'    expert parallelism: each device holds n_routed_experts / size routed experts; everything else
              treats it as more data parallelism (batches and FSDP shards span data x expert), as DeepSeek-V3
              runs attention data-parallel across the devices its experts are spread over (paper §3.4).
Every parameter carries `logical_axes` metadata (layers.normal_param); `RULES` maps each logical name to mesh
axes. A dimension takes the longest leading run of its rule's axes whose device count divides its size and that
no earlier dimension of the same array uses (routed-expert weights: 'expert' on the expert dimension, then
only 'data' on the model dimension).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('pipeline', 'data', 'expert')

RULES: Mapping[str, tuple[str, ...]] = {
    'batch': ('data', 'expert'),  # sequences over every non-pipeline device
    'embed': ('data', 'expert'),  # FSDP; the projections without a model dimension shard their low-rank one:
    'q_lora': ('data', 'expert'),
    'kv_lora': ('data', 'expert'),
    'expert': ('expert',),
    'layers': ('pipeline',),  # stacked blocks: each pipeline stage stores its own (pipeline.py)
}


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


def logical_spec(logical_axes, shape, mesh: Mesh) -> P:
  """The PartitionSpec of an array whose dimensions have these logical names (see RULES)."""
  used, parts = set(), []
  for name, size in zip(logical_axes, shape):
    axes = tuple(a for a in RULES.get(name, ()) if mesh.shape[a] > 1 and a not in used)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    parts.append((axes[0] if len(axes) == 1 else axes) if axes else None)
    used.update(axes)
  return P(*parts)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of nnx Variables (params, router biases, optimizer moments: each from its
  `logical_axes`) and plain arrays (replicated), in the tree's own structure."""

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      axes = leaf.get_metadata().get('logical_axes')
      return leaf.replace(NamedSharding(mesh, logical_spec(axes, leaf.shape, mesh) if axes else P()))
    return replicated(mesh)

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
