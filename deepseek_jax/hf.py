"""Hugging Face DeepSeek-V3 checkpoints: load into `DeepSeekV3`, save back (the layout of deepseek-ai/DeepSeek-V3 on
the hub).

A checkpoint is config.json plus one or many safetensors files. Weights are fp32 / bf16, or DeepSeek FP8:
float8_e4m3fn `weight` with an fp32 `weight_scale_inv` per 128x128 block (edge blocks partial), dequantized
here as weight * scale_inv (the "inv" is historical: it multiplies). The MTP module is stored as layer
`num_hidden_layers` (+k), with copies of the embedding and head; HF transformers ignores it, we load it.

Conversion is a rename table: our parameter paths (official names, kernels stored [in, out]) against the
checkpoint names (weights [out, in]); each stacked (layer, expert) Variable is read straight into its
device shards, a slice of each tensor at a time (load_hf).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Iterator, NamedTuple

import jax
import numpy as np
from absl import logging
from flax import nnx

from deepseek_jax import quant4, sharding
from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.hf_config import from_hf, to_hf
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.safetensors_io import SafetensorsDir, write_dir, write_json
from pallas_kernels.weight_quant import weight_quant

FP8_BLOCK = 128
HOST_BLOCK_TENSORS = 2  # load_hf assembles a device block on the host up to this many of the largest tensor
_FLOAT_CODES = ('F32', 'BF16', 'F16')

_TOP = {
    ('embed', 'embedding'): 'model.embed_tokens.weight',
    ('norm', 'scale'): 'model.norm.weight',
    ('head', 'kernel'): 'lm_head.weight',
}
_BLOCK = {
    ('attn_norm', 'scale'): 'input_layernorm.weight',
    ('ffn_norm', 'scale'): 'post_attention_layernorm.weight',
    ('attn', 'wq', 'kernel'): 'self_attn.q_proj.weight',
    ('attn', 'wq_a', 'kernel'): 'self_attn.q_a_proj.weight',
    ('attn', 'q_norm', 'scale'): 'self_attn.q_a_layernorm.weight',
    ('attn', 'wq_b', 'kernel'): 'self_attn.q_b_proj.weight',
    ('attn', 'wkv_a', 'kernel'): 'self_attn.kv_a_proj_with_mqa.weight',
    ('attn', 'kv_norm', 'scale'): 'self_attn.kv_a_layernorm.weight',
    ('attn', 'wkv_b', 'kernel'): 'self_attn.kv_b_proj.weight',
    ('attn', 'wo', 'kernel'): 'self_attn.o_proj.weight',
    ('ffn', 'w1', 'kernel'): 'mlp.gate_proj.weight',
    ('ffn', 'w2', 'kernel'): 'mlp.down_proj.weight',
    ('ffn', 'w3', 'kernel'): 'mlp.up_proj.weight',
    ('ffn', 'gate', 'weight'): 'mlp.gate.weight',
    ('ffn', 'gate', 'bias'): 'mlp.gate.e_score_correction_bias',
    ('ffn', 'shared_experts', 'w1', 'kernel'): 'mlp.shared_experts.gate_proj.weight',
    ('ffn', 'shared_experts', 'w2', 'kernel'): 'mlp.shared_experts.down_proj.weight',
    ('ffn', 'shared_experts', 'w3', 'kernel'): 'mlp.shared_experts.up_proj.weight',
    ('ffn', 'experts', 'w1'): 'mlp.experts.{e}.gate_proj.weight',
    ('ffn', 'experts', 'w2'): 'mlp.experts.{e}.down_proj.weight',
    ('ffn', 'experts', 'w3'): 'mlp.experts.{e}.up_proj.weight',
}
_MTP = {
    ('enorm', 'scale'): 'enorm.weight',
    ('hnorm', 'scale'): 'hnorm.weight',
    ('eh_proj', 'kernel'): 'eh_proj.weight',
    ('shared_head_norm', 'scale'): 'shared_head.norm.weight',
}
# Stored in each MTP layer as copies of the main model's tensors; the model shares the originals.
_MTP_COPIES = ('embed_tokens.weight', 'shared_head.head.weight')


class Source(NamedTuple):
  """Where one of our Variables comes from: a checkpoint name per stacked (layer, expert) index."""
  names: np.ndarray  # object array of names, shape = the Variable's leading stack axes (() if none)
  transpose: bool  # checkpoint [out, in] vs our [in, out]
  held: str | None  # weights held quantized: 'codes' or 'scales' (FP8: the weight_scale_inv)
  shape: tuple[int, ...]  # per-name logical shape, ours ([in, out]); FP8 codes are padded beyond it
  fmt: str = 'fp8'  # the held format: 'fp8' (names the checkpoint's) or a quant4 format (quantized on load)


def checkpoint_layout(model: DeepSeekV3) -> dict[tuple, Source]:
  """Our Variable path -> checkpoint source, for every Variable of the model."""
  cfg = model.cfg
  # Logical (unpadded) shapes come from the same model with its weights in high precision.
  plain = dict(nnx.to_flat_state(nnx.state(nnx.eval_shape(
      lambda: DeepSeekV3(cfg, model.rt.replace(fp8_weights=False, weights4='none'), nnx.Rngs(0))))))
  layout = {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    held_scale = path[-1].endswith('_scale')
    base = path[:-1] + (path[-1][:-len('_scale')],) if held_scale else path
    source = _source(base, plain[base].shape, cfg)
    fmt = model.rt.weights4 if model.rt.weights4 != 'none' and base[-2] == 'experts' else 'fp8'
    held = 'scales' if held_scale else ('codes' if variable.dtype != plain[base].dtype else None)
    stack = source.names.ndim
    names = source.names
    if held_scale and fmt == 'fp8':
      names = np.vectorize(lambda n: n + '_scale_inv', otypes=[object])(source.names)
    layout[path] = Source(names, source.transpose, held, tuple(plain[base].shape[stack:]), fmt)
  return layout


def _source(path: tuple, shape: tuple[int, ...], cfg: ModelConfig) -> Source:
  transpose = path[-1] in ('kernel', 'weight') or path[-2] == 'experts'
  if path in _TOP:
    return Source(np.array(_TOP[path], dtype=object), transpose, None, shape)
  if path[0] in ('dense_layers', 'moe_layers'):
    first = 0 if path[0] == 'dense_layers' else cfg.n_dense_layers
    layers, rest = range(first, first + shape[0]), path[1:]
  elif path[0] == 'mtp' and path[2] == 'block':
    layers, rest = [cfg.n_layers + path[1]], path[3:]
  elif path[0] == 'mtp' and path[2:] in _MTP:
    return Source(np.array(f'model.layers.{cfg.n_layers + path[1]}.{_MTP[path[2:]]}', dtype=object), transpose,
                  None, shape)
  else:
    raise KeyError(f'no checkpoint name for parameter {"/".join(map(str, path))}')
  template = _BLOCK[rest]
  experts = range(shape[1] if path[0] != 'mtp' else shape[0]) if '{e}' in template else [None]
  names = np.array([[f'model.layers.{l}.' + template.format(e=e) for e in experts] for l in layers], dtype=object)
  if path[0] == 'mtp':
    names = names[0]
  if '{e}' not in template:
    names = names[..., 0]
  return Source(names, transpose, None, shape)


# Loading --------------------------------------------------------------------------------------------


def load_hf(path: str, rt: Runtime = Runtime(), mesh=None, allow_replicated: bool = False,
            report: dict | None = None) -> tuple[ModelConfig, DeepSeekV3]:
  """Reads a HF DeepSeek-V3 directory into (config, model), run as `rt` says (e.g. config.BF16).

  Each parameter is created directly in its sharding on `mesh` (default: this process's first device; the
  rules of sharding.py): each of this process's devices gets its block written in place, one stacked
  (layer, expert) entry at a time, from only the rows and columns of that entry's tensor the block covers
  (memory-mapped reads), so the host holds one slice of one tensor at a time, never a stacked tensor, and
  in a multi-process run each process reads only what its own devices hold. FP8 weights are dequantized
  per slice with the scales of the blocks it covers. With rt.fp8_weights the projections and experts keep
  FP8 codes and block scales (stored codes read per slice too; weights quantized on load, a whole tensor at
  a time); with rt.weights4 the routed experts are quantized on load to packed 4-bit codes and group scales,
  one expert's tensor at a time.
  Every tensor's name, shape and dtype is checked before anything is allocated: a ValueError names the
  first missing, unknown, mis-shaped or wrongly typed one. `report`, if given, receives bytes_read (this
  process's distinct blocks, as loaded), total_bytes (the whole model) and seconds.
  """
  cfg, hf_config = read_config(path)
  _check_quantization(hf_config.get('quantization_config'))
  store = SafetensorsDir(path)
  # The MTP layers are optional in a checkpoint (transformers' save_pretrained drops them).
  present = sum(f'model.layers.{cfg.n_layers + k}.eh_proj.weight' in store for k in range(cfg.n_mtp_layers))
  cfg = cfg.replace(n_mtp_layers=present)

  abstract = nnx.eval_shape(lambda: DeepSeekV3(cfg, rt, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  layout = checkpoint_layout(abstract)
  _check_unknown(store, layout, cfg)
  for source in layout.values():
    _check_source(store, source)
  mesh = mesh if mesh is not None else sharding.make_mesh(data=1, devices=jax.local_devices()[:1])
  shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh, allow_replicated)))
  flat = nnx.to_flat_state(state)
  progress = _Progress(path, sum(v.size * np.dtype(v.dtype).itemsize for _, v in flat), len(flat))
  # Host memory for a block assembled at once: HOST_BLOCK_TENSORS of the largest tensor (fp32), never a stack.
  budget = HOST_BLOCK_TENSORS * max(math.prod(store.shape(name)) for name in store.names()) * 4
  for key, variable in flat:
    source, named = layout[key], shardings[key].get_value()
    value, read = _sharded(store, source, variable.shape, np.dtype(variable.dtype), named, rt, budget)
    variable.set_value(value)
    progress.done('/'.join(map(str, key)), read)
  if report is not None:
    report.update(bytes_read=progress.bytes, total_bytes=progress.total, seconds=time.time() - progress.start)
  return cfg, nnx.merge(graphdef, state)


def _sharded(store: SafetensorsDir, source: Source, shape, dtype, named, rt: Runtime, host_budget: int
             ) -> tuple[jax.Array, int]:
  """One Variable as a global array in sharding `named`, and the bytes read for it. Each distinct block this
  process's devices hold is assembled once, on the first device holding it, then copied device to device to
  the others holding the same block. A block within `host_budget` bytes is assembled on the host and sent
  at once; a larger one (a device's share of an expert stack) is zeroed on the device and written in place
  one stacked (layer, expert) entry at a time, so the host holds one entry's slice of one tensor."""
  stack = source.names.ndim
  buffers, built, read = [], {}, 0
  for device, index in named.addressable_devices_indices_map(tuple(shape)).items():
    index = tuple(slice(*i.indices(d)) for i, d in zip(index, shape))
    key = tuple((i.start, i.stop, i.step) for i in index)
    if key in built:  # replicated over some mesh axis: read once per process
      buffers.append(jax.device_put(built[key], device))
      continue
    block = tuple(len(range(*i.indices(d))) for i, d in zip(index, shape))
    if stack == 0:  # one tensor: its block is the piece
      piece = _read_entry(store, source, (), index, dtype, rt)
      buffer, read = _to_device(piece, device), read + piece.nbytes
    elif math.prod(block) * dtype.itemsize <= host_budget:  # small: assembled on the host, one transfer
      host = np.empty(block, dtype)
      for position in np.ndindex(*block[:stack]):
        entry = tuple(i.start + p * i.step for i, p in zip(index[:stack], position))
        host[position] = _read_entry(store, source, entry, index[stack:], dtype, rt)
      buffer, read = _to_device(host, device), read + host.nbytes
      del host
    else:
      buffer = _zeros(jax.device_put(np.zeros((), dtype), device), block)  # made on the device, not the host
      for position in np.ndindex(*block[:stack]):
        entry = tuple(i.start + p * i.step for i, p in zip(index[:stack], position))
        piece = _read_entry(store, source, entry, index[stack:], dtype, rt)
        buffer, read = _write(buffer, _to_device(piece, device), position), read + piece.nbytes
    built[key] = buffer
    buffers.append(buffer)
  return jax.make_array_from_single_device_arrays(tuple(shape), named, buffers), read


def _to_device(host: np.ndarray, device) -> jax.Array:
  """`host` copied to `device`, waited for: a transfer in flight keeps its host array alive, so without the
  wait a reader faster than the transfers would hold many blocks at once (measured on 2 busy cores: 1.7 MB
  against the 1.2 MB of one block and one slice)."""
  return jax.device_put(host, device).block_until_ready()


@functools.partial(jax.jit, static_argnums=1)
def _zeros(like, shape):
  return jax.numpy.zeros(shape, like.dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer, piece, position):
  """buffer[position] = piece, in place (the buffer is donated)."""
  return jax.lax.dynamic_update_slice(buffer, piece[(None,) * len(position)],
                                      tuple(position) + (0,) * piece.ndim)


class _Progress:
  """Parameters done, bytes read, throughput and ETA of a long load, logged every 30 s."""

  def __init__(self, path: str, total_bytes: int, n_variables: int):
    self.path, self.total, self.n = path, total_bytes, n_variables
    self.bytes, self.done_variables = 0, 0
    self.start = self.last = time.time()

  def done(self, name: str, nbytes: int) -> None:
    self.bytes, self.done_variables = self.bytes + nbytes, self.done_variables + 1
    now = time.time()
    if now - self.last >= 30:
      self.last, elapsed = now, now - self.start
      logging.info('load_hf %s: %d of %d parameters (last %s), %.2f GB read, %.0f MB/s, ETA %.0f s', self.path,
                   self.done_variables, self.n, name, self.bytes / 1e9, self.bytes / elapsed / 1e6,
                   elapsed * (self.n / self.done_variables - 1))


def read_config(path: str) -> tuple[ModelConfig, dict]:
  """(ModelConfig, the raw dict) of a HF directory's config.json; errors name the file."""
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{config_path} does not exist: not a Hugging Face model directory')
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f'{config_path} is not valid JSON ({error})') from None
  if not isinstance(hf_config, dict):
    raise ValueError(f'{config_path} is not a JSON object')
  try:
    return from_hf(hf_config), hf_config
  except (ValueError, TypeError) as error:
    raise ValueError(f"{config_path}: {str(error).removeprefix('config.json: ')}") from None


def _check_quantization(quant) -> None:
  if quant is None:
    return
  if quant.get('quant_method') != 'fp8' or quant.get('fmt', 'e4m3') != 'e4m3':
    raise ValueError(f'config.json: quantization_config {quant} is not DeepSeek FP8 (quant_method fp8, e4m3)')
  if list(quant.get('weight_block_size', [FP8_BLOCK, FP8_BLOCK])) != [FP8_BLOCK, FP8_BLOCK]:
    raise ValueError(f'config.json: quantization_config.weight_block_size {quant["weight_block_size"]} '
                     f'is not [{FP8_BLOCK}, {FP8_BLOCK}]')


def _check_unknown(store: SafetensorsDir, layout: dict[tuple, Source], cfg: ModelConfig) -> None:
  known = set()
  for source in layout.values():
    for name in source.names.flat:
      known.update((name, name + '_scale_inv'))
  for k in range(cfg.n_mtp_layers):
    known.update(f'model.layers.{cfg.n_layers + k}.{copy}' for copy in _MTP_COPIES)
  unknown = sorted(store.names() - known)
  if unknown:
    more = f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''
    raise ValueError(f'checkpoint tensor {unknown[0]!r}{more} does not belong to this model config')


def _read_entry(store: SafetensorsDir, source: Source, entry, inner, dtype, rt: Runtime) -> np.ndarray:
  """The `inner` block (a slice per non-stacked dimension) of the stacked entry `entry` (layer, expert)."""
  name = source.names[entry]
  if source.held and source.fmt != 'fp8':  # held 4-bit: quantized now
    piece = _held_quant4(store, source, entry, rt, inner)
  elif source.held:  # held FP8: the block of the (padded) codes or scales
    piece = _held_fp8(store, source, entry, rt, inner)
  elif source.transpose:  # ours [in, out] is the checkpoint's [out, in]
    piece = _dequantized(store, name, inner[::-1]).T
  else:
    piece = _dequantized(store, name, inner)
  return np.ascontiguousarray(piece, dtype)


def _dequantized(store: SafetensorsDir, name: str, index) -> np.ndarray:
  """store[name][index] as float32; an FP8 tensor times the scales of the 128x128 blocks the slice covers."""
  view = store.read(name)[index]
  if store.dtype_code(name) != 'F8_E4M3':
    return np.asarray(view, np.float32)
  scale = store.read(name + '_scale_inv')
  rows, cols = (np.arange(*i.indices(d)) // FP8_BLOCK for i, d in zip(index, store.shape(name)))
  return np.asarray(view).astype(np.float32) * scale[np.ix_(rows, cols)]


def _check_source(store: SafetensorsDir, source: Source) -> None:
  """Every tensor behind one Variable: present, of its shape and a loadable dtype (FP8 with its scales)."""
  stored = source.shape[::-1] if source.transpose else source.shape
  for name in source.names.flat:
    if source.held and source.fmt == 'fp8':
      weight_name = name[:-len('_scale_inv')] if source.held == 'scales' else name
      _check_tensor(store, weight_name, stored)
    else:
      _check_tensor(store, name, stored)


def _check_tensor(store: SafetensorsDir, name: str, shape) -> None:
  if name not in store:
    raise ValueError(f'checkpoint is missing tensor {name!r}')
  if store.shape(name) != tuple(shape):
    raise ValueError(f'checkpoint tensor {name!r} has shape {store.shape(name)}, expected {tuple(shape)}')
  code = store.dtype_code(name)
  scale_name = name + '_scale_inv'
  if code == 'F8_E4M3':
    if scale_name not in store:
      raise ValueError(f'checkpoint tensor {name!r} is float8_e4m3fn but {scale_name!r} is missing')
    read_scale(store, scale_name, shape)  # its shape and dtype
  elif code not in _FLOAT_CODES:
    raise ValueError(f'checkpoint tensor {name!r} has dtype {code}, expected one of {_FLOAT_CODES} or F8_E4M3')
  elif scale_name in store:
    raise ValueError(f'checkpoint tensor {scale_name!r} scales {name!r}, which is {code}, not F8_E4M3')


def _held_fp8(store: SafetensorsDir, source: Source, index, rt: Runtime, inner) -> np.ndarray:
  """The `inner` block of one weight's FP8 codes [in', out'] or block scales [in'/128, out'/128] (padded to
  whole 128-blocks), as stored (only the block's rows and columns of the codes are read) or quantized now
  (from the whole tensor: a block of the quantization may span device slices)."""
  name = source.names[index]
  weight_name = name[:-len('_scale_inv')] if source.held == 'scales' else name
  stored = source.shape[::-1]
  if weight_name in store and store.dtype_code(weight_name) == 'F8_E4M3':
    if store.shape(weight_name) != stored:
      raise ValueError(f'checkpoint tensor {weight_name!r} has shape {store.shape(weight_name)}, expected {stored}')
    if source.held == 'scales':
      return read_scale(store, name, stored).T[inner]
    codes = store.read(weight_name)  # [out, in]: ours transposed, zero past the stored rows and columns
    block = np.zeros(tuple(i.stop - i.start for i in inner), codes.dtype)  # normalized, step-1 slices
    rows, cols = (slice(i.start, min(i.stop, d)) for i, d in zip(inner, source.shape))
    if rows.stop > rows.start and cols.stop > cols.start:
      block[:rows.stop - rows.start, :cols.stop - cols.start] = codes[cols, rows].T
    return block
  codes, scales = weight_quant(read_tensor(store, weight_name, stored).T, rt.fp8_scale_fmt)
  return np.asarray(scales if source.held == 'scales' else codes)[inner]


def _held_quant4(store: SafetensorsDir, source: Source, index, rt: Runtime, inner) -> np.ndarray:
  """The `inner` block of one expert weight's packed 4-bit codes [in / 2, out] or group scales [in / group,
  out], quantized from the whole tensor (read once for the codes and once for the scales; FP8 dequantized
  first)."""
  weight = read_tensor(store, source.names[index], source.shape[::-1]).T
  packed = quant4.quantize(weight, source.fmt, rt.weights4_group or None)
  return np.asarray(packed.scales if source.held == 'scales' else packed.codes)[inner]


def read_tensor(store: SafetensorsDir, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """One checkpoint tensor as float32, FP8 dequantized, with its shape and dtype checked."""
  _check_tensor(store, name, shape)
  return _dequantized(store, name, tuple(slice(None) for _ in shape))


def read_scale(store: SafetensorsDir, scale_name: str, weight_shape) -> np.ndarray:
  want = tuple(-(-d // FP8_BLOCK) for d in weight_shape)
  if len(weight_shape) != 2 or store.shape(scale_name) != want:
    raise ValueError(f'checkpoint tensor {scale_name!r} has shape {store.shape(scale_name)}, expected {want} '
                     f'(one scale per {FP8_BLOCK}x{FP8_BLOCK} block of a {tuple(weight_shape)} weight)')
  if store.dtype_code(scale_name) != 'F32':
    raise ValueError(f'checkpoint tensor {scale_name!r} has dtype {store.dtype_code(scale_name)}, expected F32')
  return store.read(scale_name)


def dequantize_fp8(w_fp8, scale_inv, block: int = FP8_BLOCK) -> np.ndarray:
  """w[i, j] * scale_inv[i // block, j // block] in float32 (official `weight_dequant`)."""
  rows, cols = w_fp8.shape
  scale = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block, axis=0), block, axis=1)[:rows, :cols]
  return np.asarray(w_fp8).astype(np.float32) * scale


# Saving ---------------------------------------------------------------------------------------------


def save_hf(cfg: ModelConfig, model: DeepSeekV3, path: str, max_shard_bytes: int = 5 * 10**9) -> None:
  """Writes config.json and safetensors shards in the official layout; `load_hf(path)` reproduces model."""
  if model.cfg != cfg:
    raise ValueError('save_hf: cfg differs from the config the model was built with')
  if model.rt.weights4 != 'none':
    raise ValueError(f'save_hf: experts held in {model.rt.weights4} have no official checkpoint format; save '
                     'the bf16 / FP8 model they were quantized from')
  write_dir(path, _tensors(model), max_shard_bytes)
  hf_config = to_hf(cfg, model.rt.param_dtype)
  if model.rt.fp8_weights:
    hf_config['quantization_config'] = {'activation_scheme': 'dynamic', 'fmt': 'e4m3', 'quant_method': 'fp8',
                                        'weight_block_size': [FP8_BLOCK, FP8_BLOCK]}
  write_json(os.path.join(path, 'config.json'), hf_config)


def _tensors(model: DeepSeekV3) -> Iterator[tuple]:
  state = dict(nnx.to_flat_state(nnx.state(model)))
  for path, source in checkpoint_layout(model).items():
    variable = state[path]
    for index in np.ndindex(*source.names.shape):
      # Held FP8 codes are written at their logical shape; block scales keep theirs.
      shape = tuple(variable.shape[len(source.names.shape):]) if source.held == 'scales' else source.shape
      yield (source.names[index], shape[::-1] if source.transpose else shape, variable.dtype,
             lambda v=variable, i=index, t=source.transpose, s=shape: _host(v, i, t, s))
  cfg = model.cfg
  for k in range(cfg.n_mtp_layers):
    prefix = f'model.layers.{cfg.n_layers + k}.'
    for name, path in zip(_MTP_COPIES, (('embed', 'embedding'), ('head', 'kernel'))):
      variable, transpose = state[path], path[-1] == 'kernel'
      shape = variable.shape[::-1] if transpose else variable.shape
      yield prefix + name, shape, variable.dtype, lambda v=variable, t=transpose: _host(v, (), t, v.shape)


def _host(variable, index, transpose: bool, shape) -> np.ndarray:
  array = np.asarray(variable[...][index])[tuple(slice(0, d) for d in shape)]
  return array.T if transpose else array
