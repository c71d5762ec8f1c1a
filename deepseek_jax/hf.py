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
import os
import time
from typing import Iterator, NamedTuple

import jax
import numpy as np
from absl import logging
from flax import nnx

from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig, Runtime
from deepseek_jax.hf_config import from_hf, to_hf
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.safetensors_io import SafetensorsDir, write_dir, write_json
from pallas_kernels.common import FP8
from pallas_kernels.weight_quant import weight_quant

FP8_BLOCK = 128
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
  fp8: str | None  # weights held in FP8: 'codes' (the weight) or 'scales' (its weight_scale_inv)
  shape: tuple[int, ...]  # per-name logical shape, ours ([in, out]); FP8 codes are padded beyond it


def checkpoint_layout(model: DeepSeekV3) -> dict[tuple, Source]:
  """Our Variable path -> checkpoint source, for every Variable of the model."""
  cfg = model.cfg
  # Logical (unpadded) shapes come from the same model with its weights in high precision.
  plain = dict(nnx.to_flat_state(nnx.state(nnx.eval_shape(
      lambda: DeepSeekV3(cfg, model.rt.replace(fp8_weights=False), nnx.Rngs(0))))))
  layout = {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    held_scale = path[-1].endswith('_scale')
    base = path[:-1] + (path[-1][:-len('_scale')],) if held_scale else path
    source = _source(base, plain[base].shape, cfg)
    fp8 = 'scales' if held_scale else ('codes' if variable.dtype == FP8 else None)
    stack = source.names.ndim
    names = np.vectorize(lambda n: n + '_scale_inv', otypes=[object])(source.names) if held_scale else source.names
    layout[path] = Source(names, source.transpose, fp8, tuple(plain[base].shape[stack:]))
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


def load_hf(path: str, rt: Runtime = Runtime(), mesh=None, allow_replicated: bool = False
            ) -> tuple[ModelConfig, DeepSeekV3]:
  """Reads a HF DeepSeek-V3 directory into (config, model), run as `rt` says (e.g. config.BF16).

  Each parameter is created directly in its sharding on `mesh` (default: this process's first device; the
  rules of sharding.py): each of this process's devices gets its block written in place, one stacked
  (layer, expert) entry at a time, from only the rows and columns of that entry's tensor the block covers
  (memory-mapped reads), so the host holds one slice of one tensor at a time, never a stacked tensor, and
  in a multi-process run each process reads only what its own devices hold. FP8 weights are dequantized
  per slice with the scales of the blocks it covers. With rt.fp8_weights the projections and experts keep
  FP8 codes and block scales (read a whole tensor at a time).
  Every tensor's name, shape and dtype is checked before anything is allocated: a ValueError names the
  first missing, unknown, mis-shaped or wrongly typed one.
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
  progress = _Progress(path, sum(v.size * np.dtype(v.dtype).itemsize for _, v in nnx.to_flat_state(state)))
  for key, variable in nnx.to_flat_state(state):
    source, named = layout[key], shardings[key].get_value()
    variable.set_value(_sharded(store, source, variable.shape, np.dtype(variable.dtype), named, rt))
    progress.done('/'.join(map(str, key)), variable.size * np.dtype(variable.dtype).itemsize)
  return cfg, nnx.merge(graphdef, state)


def _sharded(store: SafetensorsDir, source: Source, shape, dtype, named, rt: Runtime) -> jax.Array:
  """One Variable as a global array in sharding `named`. Each of this process's devices gets its block
  assembled on the device, one stacked (layer, expert) entry at a time written in place into a zeroed buffer,
  so the host never holds more than one entry's slice of one tensor."""
  stack = source.names.ndim
  buffers = []
  for device, index in named.addressable_devices_indices_map(tuple(shape)).items():
    index = tuple(slice(*i.indices(d)) for i, d in zip(index, shape))
    block = tuple(len(range(*i.indices(d))) for i, d in zip(index, shape))
    if stack == 0:  # one tensor: its block is the piece
      buffers.append(jax.device_put(_read_entry(store, source, (), index, dtype, rt), device))
      continue
    buffer = _zeros(jax.device_put(np.zeros((), dtype), device), block)  # made on the device, not the host
    for position in np.ndindex(*block[:stack]):
      entry = tuple(i.start + p * i.step for i, p in zip(index[:stack], position))
      piece = jax.device_put(_read_entry(store, source, entry, index[stack:], dtype, rt), device)
      buffer = _write(buffer, piece, position)
    buffers.append(buffer)
  return jax.make_array_from_single_device_arrays(tuple(shape), named, buffers)


@functools.partial(jax.jit, static_argnums=1)
def _zeros(like, shape):
  return jax.numpy.zeros(shape, like.dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer, piece, position):
  """buffer[position] = piece, in place (the buffer is donated)."""
  return jax.lax.dynamic_update_slice(buffer, piece[(None,) * len(position)],
                                      tuple(position) + (0,) * piece.ndim)


class _Progress:
  """Tensors / bytes / ETA of a long load, logged every 30 s."""

  def __init__(self, path: str, total_bytes: int):
    self.path, self.total, self.bytes, self.tensors = path, total_bytes, 0, 0
    self.start = self.last = time.time()

  def done(self, name: str, nbytes: int) -> None:
    self.bytes, self.tensors = self.bytes + nbytes, self.tensors + 1
    now = time.time()
    if now - self.last >= 30:
      self.last = now
      rate = self.bytes / max(now - self.start, 1e-9)
      logging.info('load_hf %s: %d parameters (%s), %.1f of %.1f GB, %.0f MB/s, ETA %.0f s', self.path,
                   self.tensors, name, self.bytes / 1e9, self.total / 1e9, rate / 1e6,
                   (self.total - self.bytes) / max(rate, 1e-9))


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
  if source.fp8:  # held FP8: codes or scales of the whole tensor (padded), then the block
    piece = _held_fp8(store, source, entry, rt)[inner]
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
    if source.fp8:
      weight_name = name[:-len('_scale_inv')] if source.fp8 == 'scales' else name
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


def _held_fp8(store: SafetensorsDir, source: Source, index, rt: Runtime) -> np.ndarray:
  """FP8 codes [in', out'] or block scales [in'/128, out'/128] of one weight, as stored or quantized now."""
  name = source.names[index]
  weight_name = name[:-len('_scale_inv')] if source.fp8 == 'scales' else name
  stored = source.shape[::-1]
  if weight_name in store and store.dtype_code(weight_name) == 'F8_E4M3':
    if store.shape(weight_name) != stored:
      raise ValueError(f'checkpoint tensor {weight_name!r} has shape {store.shape(weight_name)}, expected {stored}')
    if source.fp8 == 'scales':
      return read_scale(store, name, stored).T
    codes = np.zeros(tuple(-(-d // FP8_BLOCK) * FP8_BLOCK for d in source.shape), store.read(weight_name).dtype)
    codes[:source.shape[0], :source.shape[1]] = store.read(weight_name).T
    return codes
  codes, scales = weight_quant(read_tensor(store, weight_name, stored).T, rt.fp8_scale_fmt)
  return np.asarray(scales if source.fp8 == 'scales' else codes)


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
      shape = tuple(variable.shape[len(source.names.shape):]) if source.fp8 == 'scales' else source.shape
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
