"""Safetensors directories: lazy reads of any dtype (bf16, fp8 included) and sharded, atomic writes.

Reading: safetensors' numpy backend maps dtypes through plain numpy, which has no bfloat16 or float8, so
tensors are memory-mapped here from the format's documented layout (u64 little-endian header length, a
JSON header with dtype / shape / data_offsets, then the raw bytes) and viewed through ml_dtypes. Nothing
is read from disk until a tensor is asked for. Writing goes through `safetensors.serialize_file`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
import safetensors

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'

DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}


class SafetensorsDir:
  """All tensors of a checkpoint directory (one file, or shards listed by model.safetensors.index.json)."""

  def __init__(self, path: str):
    self.path = path
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(n for n in os.listdir(path) if n.endswith('.safetensors'))
      weight_map = None
    if not files:
      raise FileNotFoundError(f'{path}: no .safetensors files')
    self._entries: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
    for name in files:
      file_path = os.path.join(path, name)
      if not os.path.exists(file_path):
        raise FileNotFoundError(f'{index_path} lists {name}, which does not exist')
      for tensor, entry in _read_header(file_path).items():
        if weight_map is None or weight_map.get(tensor) == name:
          self._entries[tensor] = (file_path, *entry)
    if weight_map is not None:
      missing = sorted(set(weight_map) - set(self._entries))
      if missing:
        raise ValueError(f'{index_path} lists tensor {missing[0]!r} but its file does not contain it')

  def names(self) -> set[str]:
    return set(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def dtype_code(self, name: str) -> str:
    return self._entries[name][1]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][2]

  def read(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view of a map of its bytes alone (no copy until converted). The map
    goes when the view does, so the pages a load touched leave this process's memory with each tensor."""
    file_path, code, shape, begin, end = self._entries[name]
    if code not in DTYPES:
      raise ValueError(f'tensor {name!r}: unsupported safetensors dtype {code}')
    if end == begin:
      return np.zeros(shape, DTYPES[code])
    return np.memmap(file_path, dtype=np.uint8, mode='r', offset=begin, shape=(end - begin,)).view(
        DTYPES[code]).reshape(shape)


def _read_header(file_path: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
  """The tensors of one file, its layout checked against the file's size before anything is mapped: a
  truncated, empty or foreign file (a pickle named .safetensors) fails here, named."""
  size = os.path.getsize(file_path)
  bad = lambda why: ValueError(f'{file_path} is not a complete safetensors file: {why}')
  with open(file_path, 'rb') as f:
    if size < 8:
      raise bad(f'{size} bytes, shorter than the 8-byte header length')
    (n,) = struct.unpack('<Q', f.read(8))
    if n > size - 8:
      raise bad(f'its header length {n} exceeds the {size - 8} bytes after it (truncated, or another format)')
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      raise bad(f'its header is not JSON ({error})') from None
  if not isinstance(header, dict):
    raise bad('its header is not a JSON object')
  header.pop('__metadata__', None)
  data_start = 8 + n
  entries = {}
  for name, info in header.items():
    try:
      code, shape, (begin, end) = info['dtype'], tuple(int(d) for d in info['shape']), info['data_offsets']
    except (KeyError, TypeError, ValueError):
      raise bad(f'tensor {name!r} has no valid dtype / shape / data_offsets ({info!r})') from None
    if data_start + end > size or not 0 <= begin <= end:
      raise bad(f'tensor {name!r} needs bytes [{data_start + begin}, {data_start + end}) of a {size}-byte file '
                '(truncated)')
    if code in DTYPES and end - begin != math.prod(shape) * DTYPES[code].itemsize:
      raise bad(f'tensor {name!r}: {end - begin} bytes for shape {shape} of {code}')
    entries[name] = (code, shape, data_start + begin, data_start + end)
  return entries


def write_dir(path: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
              max_shard_bytes: int = 5 * 10**9) -> None:
  """Writes (name, shape, dtype, produce) tensors as HF-style shards; each array is produced when its shard
  is written, and every file appears atomically (written to a temporary name, then renamed)."""
  tensors = list(tensors)
  shards: list[list] = [[]]
  size = 0
  for item in tensors:
    nbytes = int(np.prod(item[1])) * np.dtype(item[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  os.makedirs(path, exist_ok=True)
  n = len(shards)
  names = [SINGLE_FILE] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
  weight_map = {}
  for file_name, shard in zip(names, shards):
    arrays = {}
    for name, shape, dtype, produce in shard:
      array = np.ascontiguousarray(produce(), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f'tensor {name!r}: produced shape {array.shape}, declared {tuple(shape)}')
      arrays[name] = array
      weight_map[name] = file_name
    specs = {name: safetensors.TensorSpec(dtype=a.dtype.name, shape=list(a.shape), data_ptr=a.ctypes.data,
                                          data_len=a.nbytes) for name, a in arrays.items()}
    _atomic(os.path.join(path, file_name),
            lambda tmp: safetensors.serialize_file(specs, tmp, metadata={'format': 'pt'}))
    del arrays, specs
  if n > 1:
    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d, _ in tensors)
    index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
    _atomic(os.path.join(path, INDEX_FILE), lambda tmp: _write_text(tmp, json.dumps(index, indent=2)))
  # Shards of an earlier save that this one does not overwrite would be read as part of the checkpoint.
  for stale in os.listdir(path):
    if (stale.startswith('model') and stale.endswith('.safetensors') and stale not in names) or (
        stale == INDEX_FILE and n == 1):
      os.unlink(os.path.join(path, stale))


def write_json(file_path: str, value) -> None:
  _atomic(file_path, lambda tmp: _write_text(tmp, json.dumps(value, indent=2, sort_keys=True)))


def _write_text(file_path: str, text: str) -> None:
  with open(file_path, 'w') as f:
    f.write(text)


def _atomic(file_path: str, write: Callable[[str], None]) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file_path), prefix='.tmp-')
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, file_path)
  except BaseException:
    os.unlink(tmp)
    raise
