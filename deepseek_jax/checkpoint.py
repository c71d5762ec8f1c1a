"""Crash-safe training checkpoints with orbax-checkpoint.

Each checkpoint holds the train state (params, router biases, optimizer state, counters) and a JSON `meta`
item (step, tokens seen, data-iterator state). Orbax writes a checkpoint into a temporary directory and
renames it when complete, so one that a crash interrupted is never listed. A listed checkpoint that still
fails to restore (damaged files) is skipped with a warning, and the next older one is used.
"""

from __future__ import annotations

import logging as std_logging
from typing import Any

import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Async saves every few steps, keeps the newest `keep`, restores the newest readable one."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'meta'))

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint that restores, or None when there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as error:  # a damaged checkpoint must not end the run while an older one exists
        # Orbax leaves the failed read's futures behind; asyncio would print each one's traceback.
        std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)
        logging.warning('checkpoint at step %d is unreadable (%s: %s); falling back to an older one', step,
                        type(error).__name__, str(error).splitlines()[0][:200])
        continue
      return step, restored.state, restored.meta
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
