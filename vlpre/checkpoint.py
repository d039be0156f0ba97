"""Orbax checkpoints of the train state together with the input iterator's position.

Saving both is what makes a resumed run see exactly the batches it would have seen. A
third, small JSON item holds host-side counters (the bad-sample counts of
`data.BadSampleGuard`), so that they span the whole run across resumes; checkpoints
written before that item existed restore with no counters.

Orbax writes each step to a temporary directory and renames it when complete, so a
crash (kill -9) mid-save never leaves a half-written "latest" checkpoint; the trainer
deletes such leftovers when it starts (`remove_unfinished_writes`). An old step is
deleted (`keep`) only once the new one is complete, so `keep=1` always leaves one whole
checkpoint. A write that
fails (a full disk, a lost mount) raises `CheckpointWriteError`: one line naming the step
that was not written and the last complete one, which stays intact and resumable.
"""
from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import time
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from vlpre import storage


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the previous complete one is intact."""


@functools.cache
def write_replicated_arrays_from_one_replica_in_one_process() -> None:
  """Within one process, orbax writes each replicated array (a data-parallel parameter)
  from one replica. Its default (on CPU and TPU) splits the write among the replicas,
  which spreads it over the hosts of a multi-host job but within one process buys
  nothing and compiles a slice program per array shape and device at every save: a
  staged three-stage test spent 1,424 such compiles (34 s) on it. A job of several
  processes keeps orbax's default. Called where a writer is made (`Checkpointer`,
  `init_params.export_params`), once `jax.distributed` is up (it reads the process
  count); it sets orbax's global handler for `jax.Array`, once per process (cached),
  without orbax's line about overriding it."""
  if jax.process_count() > 1:
    return
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)  # orbax warns that it overrides its own default
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    absl_logger.setLevel(level)


def remove_unfinished_writes(directory: epath.Path) -> list[str]:
  """Deletes the step folders whose write never completed (orbax's temporary folders: a
  `<step>.orbax-checkpoint-tmp-*` folder locally, a step without its commit marker in a
  bucket), which a kill mid-save leaves behind for good. Returns their names."""
  if not directory.is_dir():
    return []
  unfinished = [p.get() for p in ocp.path.step.all_temporary_paths(directory)]
  if unfinished:
    names = sorted(p.name for p in unfinished)
    logging.warning("removing %d unfinished checkpoint write(s) left in %s by an earlier run: %s",
                    len(names), directory, ", ".join(names))
    for path in unfinished:
      _remove(path)
  return [p.name for p in unfinished]


def _remove(path: epath.Path, attempts: int = 5) -> None:
  """rmtree, again while a write that failed in this process settles: orbax's threads of a
  failed save may still add files for a moment after `train.run` raised (a rerun in the
  same process: a notebook, a test), and rmtree then meets a folder it just emptied
  refilled. What still cannot be removed is left with a warning: a leftover folder is disk,
  not a risk (restores read complete steps only)."""
  for attempt in range(attempts):
    try:
      path.rmtree()
      return
    except FileNotFoundError:
      return
    except OSError as e:
      if attempt == attempts - 1:
        logging.warning("could not remove the unfinished checkpoint write %s (%s); it is left "
                        "in place", path, e)
        return
      time.sleep(0.2 * (attempt + 1))


class Checkpointer:
  """Async, keeps the last `keep` steps, saves every `every_steps` (or when forced)."""

  def __init__(self, directory: str, *, keep: int = 3, every_steps: int = 1000,
               async_save: bool = True, remove_unfinished: bool = False):
    """`remove_unfinished`: first delete the writes an earlier run left unfinished (the
    trainer, which holds the workdir's lock; never a reader such as vlpre.evaluate, which
    could delete a running trainer's write in progress)."""
    self.directory = storage.path(directory, what="checkpoint directory")  # local or gs://
    if remove_unfinished and jax.process_index() == 0:
      remove_unfinished_writes(self.directory)
    write_replicated_arrays_from_one_replica_in_one_process()
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

  def _complete_step_on_disk(self) -> int | None:
    """The latest complete step as the directory has it. Not the manager's own list: that
    drops a step due for deletion (`keep`) when the next write starts, not when it ends."""
    try:
      self._manager.reload()
    except Exception:  # pylint: disable=broad-exception-caught
      return None  # the storage itself fails; the message still names what was not written
    return self._manager.latest_step()

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
          f"the last complete checkpoint, step {self._complete_step_on_disk()}, is intact: "
          f"fix the cause and rerun to resume from it")
      error.errno = getattr(e, "errno", None)
      raise error from e


def restore_params(workdir: str, names, *, what: str = "init_from.workdir") -> dict[str, Any]:
  """Top-level parameter subtrees (e.g. "img") of a vlpre run's latest checkpoint, as numpy.

  Restored onto this host's first device whatever mesh saved them (orbax's fallback
  sharding): without a target orbax rebuilds the saving topology, so a pod's (or 8 fake
  devices') checkpoint would not restore on a 1-device laptop. `what` names the setting
  that pointed here, for the error lines.
  """
  directory = storage.path(workdir, what=what) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"{what}: no checkpoint in {directory}")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{what}: no checkpoint in {directory}")
    params = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=device)))["state"]["params"]
  missing = [n for n in names if n not in params]
  if missing:  # a run's checkpoint holds its trainable parameters only
    raise ValueError(f"{what}: {directory} step {step} has no parameters {missing}; a frozen "
                     "tower (LiT) lives in the run it came from (its config.init_from.workdir)")
  return {n: jax.tree.map(np.asarray, params[n]) for n in names}
