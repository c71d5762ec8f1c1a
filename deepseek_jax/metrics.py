"""Run metrics: WORKDIR/metrics.jsonl (one JSON object per step), TensorBoard events, a loss-curve PNG."""

from __future__ import annotations

import json
import os

from absl import logging


class MetricsWriter:
  """Appends step records; on resume, drops the records of steps after the restored checkpoint."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    records = read_metrics(self.path)
    kept = [r for r in records if r['step'] <= resume_step]
    if len(kept) != len(records):
      with open(self.path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
    self._file = open(self.path, 'a')
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)
    except ImportError:
      logging.warning('tensorboardX is not installed: no TensorBoard events')
      self._tb = None

  def write(self, step: int, scalars: dict) -> None:
    record = {'step': step, **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(records: list[dict], path: str) -> None:
  """Training loss per step and validation loss at evaluation steps, as a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  train = [(r['step'], r['ce']) for r in records if 'ce' in r]
  val = [(r['step'], r['val_loss']) for r in records if 'val_loss' in r]
  if train:
    ax.plot(*zip(*train), label='train next-token CE', linewidth=1)
  if val:
    ax.plot(*zip(*val), 'o-', label='validation CE')
  ax.set_xlabel('step')
  ax.set_ylabel('nats / token')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
