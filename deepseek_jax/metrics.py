"""Run metrics: WORKDIR/metrics.jsonl (one JSON object per step), TensorBoard events, a loss-curve PNG."""

from __future__ import annotations

import json
import os

from absl import logging


class MetricsWriter:
  """Appends step records; on resume, drops the records of steps after the restored checkpoint."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled  # False: another process writes the run's metrics
    if not enabled:
      return
    if os.path.exists(self.path):  # rewritten whole (atomically): also drops a last line a crash cut short
      kept = [r for r in read_metrics(self.path) if r['step'] <= resume_step]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(self.path + '.tmp', self.path)
    self._file = open(self.path, 'a')
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)
    except ImportError:
      logging.warning('tensorboardX is not installed: no TensorBoard events')
      self._tb = None

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': step, **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), step)

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl. A last line cut short (a crash while it was written) is dropped with a
  warning; a damaged line before it raises, naming the file and line."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
  records = []
  for number, line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as error:
      if number != lines[-1][0]:
        raise ValueError(f'{path}, line {number}: not a JSON record ({error}); fix or remove the line') from None
      logging.warning('%s: dropping its last line, cut short (%r)', path, line[:80])
  return records


def plot_loss_curve(runs: dict[str, list[dict]], path: str, smooth: int = 1) -> None:
  """Training next-token CE per step (mean over `smooth` steps) and validation CE of each run, as a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for label, records in runs.items():
    prefix = f'{label} ' if label else ''
    steps = [r['step'] for r in records if 'ce' in r]
    ce = [r['ce'] for r in records if 'ce' in r]
    if len(ce) >= smooth:
      mean = [sum(ce[i - smooth:i]) / smooth for i in range(smooth, len(ce) + 1)]
      what = f'train CE ({smooth}-step mean)' if smooth > 1 else 'train next-token CE'
      line, = ax.plot(steps[smooth - 1:], mean, label=prefix + what, linewidth=1)
      val = [(r['step'], r['val_loss']) for r in records if 'val_loss' in r]
      if val:
        ax.plot(*zip(*val), 'o--', color=line.get_color(), label=prefix + 'validation CE')
  ax.set_xlabel('step')
  ax.set_ylabel('nats / token')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
