"""The one vlpre trainer: mesh → input → model → shard → update → checkpoint → evals → loop.

Every method runs through `run`. A method contributes its folder (vlpre/methods/<name>/: a
model, its losses, its descriptor) and a config; nothing here knows which method runs:
  * trainable vs frozen parameters are split by the config's regexes (`config.frozen`);
    frozen ones (an LLM, a locked tower) are a separate sharded argument of the step,
    never in the optimizer state;
  * mutable collections (BatchNorm's `batch_stats`) live in `TrainState.model_state`;
  * the model reads whatever arrays the input pipeline puts in the batch (images,
    tokens, labels, cached embeddings, interleaved sequences).

Preemption: a SIGTERM during `run` (or `request_stop`) lets the current step, save or
evaluator finish; the loop then saves the last finished step if it is not saved yet,
skips the step's remaining evaluators, waits until the checkpoint is complete on disk,
and returns with `stop_requested()` true (`vlpre.main` exits with its requeue status).
Outside `run` SIGTERM does what the caller's handler does (it is put back on return).
A resumed run first runs the evaluators due at the step it resumes from whose results
metrics.jsonl lacks, so a stop or crash during evaluation loses no numbers; resuming a
finished run does only that.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import os
import signal
import threading
import time
from typing import Callable, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vlpre import checkpoint as checkpoint_lib
from vlpre import config_lib
from vlpre import data as data_lib
from vlpre import distributed
from vlpre import evaluators as evaluators_lib
from vlpre import fatal
from vlpre import init_params
from vlpre import methods
from vlpre import metrics as metrics_lib
from vlpre import optim
from vlpre import profiling
from vlpre import run_record
from vlpre import sharding
from vlpre import storage
from vlpre import train_state
from vlpre import workdir_lock

_STOP = threading.Event()


def stop_requested() -> bool:
  """Whether a SIGTERM (or `request_stop`) arrived during the last `run`.

  It then returned early with its last finished step saved, or (when the signal came
  after its last step and evaluators) finished anyway; either way a rerun resumes or is
  a no-op, so a scheduler should requeue the job.
  """
  return _STOP.is_set()


def request_stop(*_):
  """Asks the loop to save the last finished step and return (the SIGTERM handler)."""
  if not _STOP.is_set():
    logging.warning("stop requested: finishing the current step, saving it, then exiting")
  _STOP.set()


@contextlib.contextmanager
def _sigterm_requests_stop():
  """While `run` runs, SIGTERM calls `request_stop`; the caller's own handler is back after.

  Left installed, the handler would outlive the run: a later SIGTERM (a scheduler ending
  the process, a test runner shutting down its workers) would set a flag nobody reads
  instead of ending the process.
  """
  _STOP.clear()
  if threading.current_thread() is not threading.main_thread():  # signals go to the main one
    yield
    return
  previous = signal.signal(signal.SIGTERM, request_stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _without_results(evals: list, step: int, workdir: str) -> list:
  """Those of `evals` with no results at `step` in metrics.jsonl (a stop or crash cut them off).

  Host 0 writes the file, so its answer is broadcast: every host runs the same evaluators.
  """
  if not evals:
    return []
  keys: set[str] = set()
  if jax.process_index() == 0:
    try:
      keys = {k for row in metrics_lib.read_metrics(workdir, (metrics_lib.METRICS_FILE,))
              if row["step"] == step for k in row}
    except FileNotFoundError:
      pass
  missing = np.array([not any(k.startswith(e.name + "/") for k in keys) for e in evals])
  if jax.process_count() > 1:
    missing = multihost_utils.broadcast_one_to_all(missing)
  return [e for e, m in zip(evals, missing) if m]


def release_host_memory() -> None:
  """Hands back what a finished run left behind: unreferenced objects, JAX's compiled
  programs, and the freed blocks glibc keeps in its arenas (returned to the OS). Called
  between the stages of a staged run, so its resident size is that of its largest stage
  rather than growing with each."""
  gc.collect()
  jax.clear_caches()
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)


_LIBC = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None  # glibc only


def run(config, workdir: str, *, on_step: Callable[[int], None] | None = None,
        export_params_to: str | None = None, devices: list[jax.Device] | None = None,
        allow_config_change: Sequence[str] = ()) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns last metrics.

  A stop request (SIGTERM) returns early with the last finished step saved (module
  docstring). `export_params_to`: once the last step is done (not on a stop request),
  every parameter, frozen ones included, is written there (`init_params.export_params`). `workdir`
  is a local path or a `gs://` URI (`vlpre.storage`). `devices`: the mesh's devices
  (default all). A checkpoint resumes under any mesh and process count: the state is
  restored into this run's shardings, the input as `vlpre.data.data_position` says. A resume whose
  config differs from the workdir's config.json (`vlpre.run_record`) in a field that
  changes the run raises `run_record.ResumeRefused`, unless `allow_config_change` names it.
  One trainer at a time: a workdir another live trainer holds is refused
  (vlpre/workdir_lock.py).
  """
  storage.path(workdir, what="workdir").mkdir(parents=True, exist_ok=True)
  with workdir_lock.held(workdir), _sigterm_requests_stop():
    return _run_locked(config, workdir, on_step=on_step, export_params_to=export_params_to,
                       devices=devices, allow_config_change=allow_config_change)


def _run_locked(config, workdir: str, *, on_step, export_params_to, devices,
                allow_config_change) -> dict[str, float]:
  """`run` in a workdir this trainer holds."""
  config = config_lib.with_workdir(config, workdir)  # run-relative defaults: the text store

  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
      every_steps=config.checkpoint.every_steps, async_save=config.checkpoint.get("async", True),
      remove_unfinished=True)
  start = distributed.from_process_0(ckpt.latest_step())  # one answer for every process
  try:
    changes = run_record.check_resume(config, workdir, start, allow_config_change)
  except run_record.ResumeRefused:
    ckpt.close()
    raise
  counters = ckpt.restore_counters(start) if start is not None else {}
  start_record, same_stream = data_lib.data_position(counters, start or 0, config.batch_size,
                                            jax.process_count())
  # Process 0's reading of the checkpoint is the run's: each host reading its own could see
  # another state of a shared filesystem, and start its share of the stream elsewhere.
  start_record = distributed.from_process_0(start_record)
  same_stream = distributed.from_process_0(same_stream)
  position = {"data_process_count": jax.process_count(), "data_start_record": start_record}
  built_tokenizer = methods.build_tokenizer(config)
  extras = methods.input_extras(config)
  dataset = data_lib.build_train_dataset(
      config.input, global_batch_size=config.batch_size, seed=config.seed,
      tokenizer=built_tokenizer if extras.tokenize else None,
      process_index=jax.process_index(), process_count=jax.process_count(),
      extra_transforms=extras.transforms, extra_keys=extras.keys, stream=extras.stream,
      records=extras.records, start_record=start_record)
  data_iter = iter(dataset)
  example = next(iter(dataset))
  run_record.write(config, workdir, example, start, changes)
  s = train_state.setup(config, example,  # a resumed state is restored, never initialised first
            mesh=None if devices is None else sharding.make_mesh(config.mesh, devices),
            restoring=start is not None)
  step_fn = s.jit_train_step()
  guard = data_lib.BadSampleGuard(config.input.get("max_bad_fraction", 0.01))
  state = s.state
  if start is not None:
    logging.info("resuming from %s step %d", ckpt.directory, start)
    state = ckpt.restore(start, train_state.with_shardings(state, s.state_shardings),
                         data_iter if same_stream else None)
    guard.restore(counters)
    if not same_stream:
      logging.warning("step %d was saved by %s processes, this run has %d: the input "
                      "restarts at global record %d (vlpre.data.data_position)", start,
                      counters["data_process_count"], jax.process_count(), start_record)
  start = start or 0

  writer = metrics_lib.MetricWriter(workdir, is_main_process=jax.process_index() == 0,
                                    wandb=config.get("wandb"), run_config=config)
  profiler = profiling.StepProfiler(config.get("profile_steps") or (), workdir)
  evals = evaluators_lib.build_evaluators(config.get("evals", {}), s, tokenizer=built_tokenizer)
  if start == 0:  # evaluators asked for "before training" numbers (at_start)
    first_evals = [e for e in evals if e.due(0, config.total_steps)]
  else:  # those of the resumed step that a stop or crash cut off
    first_evals = _without_results([e for e in evals if e.due(start, config.total_steps)],
                                   start, workdir)
  if start == config.total_steps:
    logging.info("step %d/%d: the run is finished; %s", start, config.total_steps,
                 f"running the evaluators missing from metrics.jsonl: "
                 f"{[e.name for e in first_evals]}" if first_evals else "nothing left to run")
  elif start and first_evals:
    logging.info("step %d: first running the evaluators missing from metrics.jsonl: %s", start,
                 [e.name for e in first_evals])
  progress = metrics_lib.Progress(config.total_steps, config.batch_size, start)
  rng = jax.random.key(config.seed + 1)
  log_every = config.get("log_every", 10)
  last: dict[str, float] = {}
  pending = None  # (step, device metrics): read one step late so the host never stalls.
  # Seconds each step waited for its batch (input pipeline slower than the step), logged
  # as perf/data_wait_seconds: the mean over the steps since the last logged row.
  data_waits: dict[int, float] = {}

  def finish(pending, force_log: bool = False) -> dict[str, float]:
    """Reads a dispatched step's metrics, stops on NaN/Inf, logs them when due."""
    step, device_metrics = pending
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    bad = [k for k in ("loss", "param_norm") if not math.isfinite(values[k])]
    if bad:
      last = ckpt.latest_step()
      raise FloatingPointError(
          f"{bad[0]} is {values[bad[0]]} at step {step}; stopping. " + (
              f"The last good checkpoint (step {last}) in {ckpt.directory} is intact."
              if last is not None else f"No checkpoint was written to {ckpt.directory}."))
    if force_log or step % log_every == 0 or step == 1:
      values.update(progress.report(step, values["loss"]))
      values["input/bad_fraction"] = guard.fraction
      waits = [data_waits.pop(k) for k in sorted(data_waits) if k <= step]
      if waits:
        values["perf/data_wait_seconds"] = float(np.mean(waits))
      writer.write(step, values)
    return values

  def evaluate(step: int, due: list, state: train_state.TrainState) -> dict[str, float]:
    """Runs `due` on `state`; after a stop request the rest are left to the resumed run."""
    results = {}
    for i, evaluator in enumerate(due):
      if _STOP.is_set():
        logging.info("stop requested: evaluators %s of step %d are left to the resumed run",
                     [e.name for e in due[i:]], step)
        break
      values = evaluator.run(s.variables(state))
      writer.write(step, values)
      logging.info("step %d | %s", step, metrics_lib.format_results(values))
      results.update(values)
    return results

  done = saved = start  # the last finished step; the last one saved (or being written)
  try:
    with sharding.active(s.mesh, s.rules):
      last.update(evaluate(start, first_evals, state))
      for step in range(start + 1, config.total_steps + 1):
        if _STOP.is_set():  # it came before this step: during set-up, evaluators or a save
          break
        wait_start = time.perf_counter()
        batch = data_lib.next_batch(data_iter, step)
        data_waits[step] = time.perf_counter() - wait_start
        if extras.batch_transform is not None:  # e.g. token padding trimmed to a bucket
          batch = extras.batch_transform(batch)
        guard.update(batch.get("_num_bad", 0), config.batch_size // jax.process_count())
        profiler.before(step)
        state, device_metrics = step_fn(state, s.frozen, s.device_batch(batch), rng)
        profiler.after(step, device_metrics)
        if on_step is not None:
          on_step(step)
        if pending is not None:  # step - 1 is done by now; step runs meanwhile
          last = finish(pending)
        pending, done = (step, device_metrics), step
        stopping = _STOP.is_set() or step == config.total_steps
        save = stopping or ckpt.should_save(step)
        due = [e for e in evals if e.due(step, config.total_steps)]
        if save or due:  # never checkpoint or evaluate a state whose metrics were not read
          last, pending = finish(pending, force_log=stopping), None
        if save:  # before the evaluators, so that a stop during them loses no step
          ckpt.save(step, state, data_iter, counters={**guard.counts(), **position}, force=stopping)
          saved = step
        last.update(evaluate(step, due, state))
      if _STOP.is_set() and saved != done:  # the stop came after this step's save decision
        if pending is not None:
          last, pending = finish(pending, force_log=True), None
        ckpt.save(done, state, data_iter, counters={**guard.counts(), **position}, force=True)
        saved = done
      ckpt.wait()  # complete on disk (or CheckpointWriteError) before the log says so
      if _STOP.is_set():
        logging.info("stop requested: %s; exiting early (rerun to resume)",
                     f"step {done} is saved in {ckpt.directory}" if done
                     else "before the first step, nothing to save")
      elif export_params_to:
        init_params.export_params(export_params_to, optim.merge(state.params, s.frozen))
  except Exception as e:
    fatal.end_every_process(e)  # other processes would wait in a collective (vlpre/fatal.py)
    raise
  finally:
    progress.close()  # a terminal's bar ends its line before what follows (a traceback)
    profiler.close()
    ckpt.close()
    writer.close()
  return last
