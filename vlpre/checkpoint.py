"""Orbax checkpoints of the train state together with the input iterator's position.

Saving both is what makes a resumed run see exactly the batches it would have seen. A
third, small JSON item holds host-side counters (the bad-sample counts of
`train.BadSampleGuard`), so that they span the whole run across resumes; checkpoints
written before that item existed restore with no counters.

Orbax writes each step to a temporary directory and renames it when complete, so a
crash (kill -9) mid-save never leaves a half-written "latest" checkpoint. A write that
fails (a full disk, a lost mount) raises `CheckpointWriteError`: one line naming the step
that was not written and the last complete one, which stays intact and resumable.
"""
from __future__ import annotations

import contextlib
from typing import Any

import grain
import orbax.checkpoint as ocp

from vlpre import storage


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the previous complete one is intact."""


class Checkpointer:
  """Async, keeps the last `keep` steps, saves every `every_steps` (or when forced)."""

  def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000,
               async_save: bool = True):
    self.directory = storage.path(directory, what="checkpoint directory")  # local or gs://
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "counters": ocp.JsonCheckpointHandler()})
    self._writing: int | None = None  # the step an async save may still be writing

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_iterator: Any | None, *,
           counters: dict[str, int] | None = None, force: bool = False) -> bool:
    """Starts writing `step` (async: `wait` says when it is complete). False: not due."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if counters is not None:
      items["counters"] = ocp.args.JsonSave(counters)
    if self._writing is not None:
      self.wait()  # orbax would wait for the previous save too; this names its failure
    with self._write_errors(step):
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      self._writing = step
    return saved

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores the state (with the abstract tree's shardings) and the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_counters(self, step: int) -> dict[str, int]:
    """The counters saved with `step`; {} for a checkpoint written before they were saved."""
    try:
      return dict(self._manager.restore(
          step, args=ocp.args.Composite(counters=ocp.args.JsonRestore()))["counters"])
    except KeyError:  # orbax: 'Item "counters" was not found in the checkpoint'
      return {}

  def restore_state_only(self, step: int, abstract_state: Any) -> Any:
    return self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

  def wait(self) -> None:
    """Blocks until the last save is complete on disk (raises `CheckpointWriteError` if not)."""
    with self._write_errors(self._writing):
      self._manager.wait_until_finished()
    self._writing = None

  def close(self) -> None:
    self.wait()
    self._manager.close()

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """Turns a failed write of `step` into one line that says what is still safe."""
    try:
      yield
    except ocp.checkpoint_manager.StepAlreadyExistsError:
      raise  # a caller's mistake, not a failed write
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Any: tensorstore reports I/O failures as ValueError or RuntimeError, not OSError.
      self._writing = None
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
      error = CheckpointWriteError(
          f"checkpoint step {step} could not be written to {self.directory} ({reason}); "
          f"the last complete checkpoint, step {self._manager.latest_step()}, is intact: "
          f"fix the cause and rerun to resume from it")
      error.errno = getattr(e, "errno", None)
      raise error from e
