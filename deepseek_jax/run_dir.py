"""A training run's directory: one writer at a time, reruns that never discard a run, fresh starts that keep it.

A rerun of `launch.train` with the same directory resumes. Before it writes anything, it holds the
directory's lock (one trainer per directory) and compares what the run recorded (model.json: the architecture;
run.json: the data and tokenizer) with what is asked now; any difference is refused with the fields named and
nothing touched. `--overwrite` asks for a fresh start: the old run is moved aside to a sibling directory, never
deleted.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from typing import Any, Mapping

from absl import logging

from deepseek_jax.config import ModelConfig
from deepseek_jax.safetensors_io import write_json

MODEL_FILE = 'model.json'  # the architecture (what restore_model rebuilds the model from)
RUN_FILE = 'run.json'  # the data and tokenizer the run trains on
LOCK_FILE = '.lock'
DAMAGED = 'damaged_checkpoints'  # unreadable checkpoints, moved out of checkpoints/ (kept for inspection)


class RunDirError(RuntimeError):
  """A run directory that cannot be used as asked; the message says why and what to do."""


class RunLock:
  """An exclusive OS lock (flock) on WORKDIR/.lock for the life of a trainer. The kernel releases it when the
  process exits or dies, so a lock file left by a dead process never blocks; the file records the holder's
  pid and host for the message the next trainer prints."""

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def __enter__(self) -> 'RunLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(fd)
      if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. a FUSE mount without locks
        logging.warning('%s: the filesystem has no file locks (%s); one writer per directory is not enforced',
                        self.path, error)
        return self
      if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      try:
        holder = _read_json(self.path) or {}
      except RunDirError:  # being written by its holder
        holder = {}
      raise RunDirError(f'{self.workdir} is in use by another trainer (pid {holder.get("pid", "?")} on host '
                        f'{holder.get("host", "?")}, since {holder.get("since", "?")}); one run directory has one '
                        'writer: wait for it to finish, stop it, or give another --workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def has_run(workdir: str) -> bool:
  """Whether the directory holds anything of an earlier run (beyond its lock file)."""
  return os.path.isdir(workdir) and any(name != LOCK_FILE for name in os.listdir(workdir))


def damaged_steps(workdir: str) -> list[str]:
  """The checkpoints moved out of checkpoints/ as unreadable (step.time names)."""
  path = os.path.join(workdir, DAMAGED)
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def check_compatible(workdir: str, cfg: ModelConfig, run: Mapping[str, Any], data_fingerprint: str | None = None
                     ) -> None:
  """Refuses (RunDirError naming every differing field) when the run recorded here is not the one asked for:
  another architecture, or other data / tokenizer settings (resuming would train the old weights on another
  tokenizer's ids, or overwrite the run's tokenizer under them)."""
  differences = []
  saved_model = _read_json(os.path.join(workdir, MODEL_FILE))
  if saved_model is not None:
    differences += _differences('model', saved_model, dataclasses.asdict(cfg))
  saved_run = _read_json(os.path.join(workdir, RUN_FILE))
  if saved_run is not None:
    differences += _differences('data', saved_run.get('data', {}), dict(run['data']))
  else:  # a run from before run.json: its corpus records a hash of the same settings
    corpus = _read_json(os.path.join(workdir, 'data', 'meta.json'))
    if corpus is not None and data_fingerprint is not None and corpus.get('fingerprint') != data_fingerprint:
      differences.append('data: the corpus in data/ was built from other data settings (its meta.json '
                         'fingerprint differs)')
  if differences:
    raise RunDirError(f'{workdir} holds a different run; refusing to resume it with these changes (nothing was '
                      'touched):\n  ' + '\n  '.join(differences) +
                      '\nUse another --workdir, undo the changes, or pass --overwrite to start afresh here (the '
                      'old run is moved aside, not deleted).')


def record(workdir: str, cfg: ModelConfig, run: Mapping[str, Any]) -> None:
  """Writes model.json and run.json (atomically) for restore_model and for the next rerun's check."""
  write_json(os.path.join(workdir, MODEL_FILE), dataclasses.asdict(cfg))
  write_json(os.path.join(workdir, RUN_FILE), {'data': dict(run['data'])})


def model_config(workdir: str) -> ModelConfig:
  """The architecture a training run recorded (WORKDIR/model.json)."""
  path = os.path.join(workdir, MODEL_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not a training run directory')
  with open(path) as f:
    return ModelConfig(**json.load(f))


def recorded_data(workdir: str) -> dict:
  """The data settings the run recorded (run.json), {} for a run from before run.json."""
  return (_read_json(os.path.join(workdir, RUN_FILE)) or {}).get('data', {})


def move_aside(workdir: str) -> str:
  """Moves everything of the run in `workdir` (but its lock) into a new sibling directory; returns its path."""
  aside = f'{workdir.rstrip(os.sep)}.replaced-{time.strftime("%Y%m%d-%H%M%S")}'
  suffix = 0
  while os.path.exists(aside + (f'-{suffix}' if suffix else '')):
    suffix += 1
  aside += f'-{suffix}' if suffix else ''
  os.makedirs(aside)
  for name in os.listdir(workdir):
    if name != LOCK_FILE:
      os.rename(os.path.join(workdir, name), os.path.join(aside, name))
  return aside


def _differences(section: str, saved: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
  return [f'{section}.{key}: the run has {saved.get(key, "(unset)")!r}, asked {asked.get(key, "(unset)")!r}'
          for key in sorted(set(saved) | set(asked)) if saved.get(key) != asked.get(key)]


def _read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    text = f.read()
  if not text.strip():
    return None  # an empty lock file
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise RunDirError(f'{path} is not valid JSON ({error}); fix or remove it') from None
