"""Staged training: one run as a sequence of stages, for any method.

    config.stages = (
        dict(name="projectors", steps=300, trainable=("proj_.*",), optim=dict(lr=1e-3)),
        dict(name="llm", steps=300, trainable=("proj_.*", "llm/.*"), optim=dict(lr=5e-5)),
        dict(name="all", steps=300, optim=dict(lr=5e-6, grad_clip_norm=1.0)),
    )

Each stage is an ordinary `train.run` of the config with the stage's changes applied:
  steps      its number of optimiser steps (the stage's `total_steps`)
  trainable  regexes of the parameters that train (everything else frozen), or
  frozen     regexes of the parameters that stay frozen (default: the config's)
  optim      updates of `config.optim` (lr, warm-up, clipping, schedule, ...)
  batch_size / evals / any other top-level config field, replaced for that stage.
Stage i runs in `<workdir>/<i>_<name>/` (its own checkpoints and metrics.jsonl), starts
from every parameter of stage i−1's final state (trainable and frozen, exported to
`<stage dir>/final_params` when that stage finishes), gets a fresh optimiser state, and
draws its data with seed `config.seed + i`. A finished stage is skipped on a rerun; a
run killed inside a stage resumes inside it, from that stage's latest checkpoint.

The whole config is recorded in `<workdir>/config.json` and a rerun is checked against it
(`vlpre.run_record`: a change to any stage is refused unless `allow_config_change`
names it, e.g. `stages.1.optim.lr`); each stage folder records its own stage's config, as
any run does, for `vlpre.evaluate` and `vlpre.export`.

Evaluators: unless a stage sets its own `evals`, the first stage runs the config's
evaluators marked `at_start` (numbers before any training), the last stage those marked
`at_end` (default), and stages in between none.
"""
from __future__ import annotations

import os
import re
from typing import Any

from absl import logging
import ml_collections as mlc

from vlpre import config_lib
from vlpre import distributed
from vlpre import run_record
from vlpre import storage
from vlpre import train
from vlpre import workdir_lock

_STAGE_KEYS = ("name", "steps", "trainable", "frozen", "optim")


def stage_dir(workdir: str, index: int, stage: Any) -> str:
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(stage.get("name", f"stage{index}")))
  return os.path.join(workdir, f"{index}_{name}")


def _stage_evals(config, index: int, count: int) -> dict:
  evals = {}
  for name, cfg in dict(config.get("evals", {})).items():
    cfg = dict(cfg)
    cfg["at_start"] = bool(cfg.get("at_start", False)) and index == 0
    cfg["at_end"] = bool(cfg.get("at_end", True)) and index == count - 1
    if index != count - 1:
      cfg["every_steps"] = 0
    if cfg["at_start"] or cfg["at_end"] or cfg.get("every_steps"):
      evals[name] = cfg
  return evals


def stage_config(config, index: int, workdir: str) -> mlc.ConfigDict:
  """The config of stage `index`: the run's config with the stage's changes applied."""
  stages = list(config.stages)
  stage = dict(stages[index])
  if "steps" not in stage:
    raise ValueError(f"stages[{index}] ({stage.get('name')}) needs `steps`")
  if "trainable" in stage and "frozen" in stage:
    raise ValueError(f"stages[{index}]: give `trainable` or `frozen`, not both")
  c = mlc.ConfigDict(config.to_dict())
  del c["stages"]
  c.total_steps = int(stage["steps"])
  c.seed = config.seed + index
  if "trainable" in stage:
    c.frozen, c.trainable = (), tuple(stage["trainable"])
  elif "frozen" in stage:
    c.frozen = tuple(stage["frozen"])
  c.optim.update(dict(stage.get("optim", {})))
  c.evals = mlc.ConfigDict(_stage_evals(config, index, len(stages)))
  for key, value in stage.items():
    if key not in _STAGE_KEYS:
      if key not in c:
        raise ValueError(f"stages[{index}]: unknown config field {key!r}")
      c[key] = value
  if index > 0:  # start from every parameter of the previous stage's final state
    c.init_from = dict(workdir="", prefixes=(),
                       params=os.path.join(stage_dir(workdir, index - 1, stages[index - 1]),
                                           "final_params"))
  return c


def run(config, workdir: str, *, allow_config_change=()) -> dict[str, float]:
  """Runs the stages in order, skipping finished ones. Returns the last stage's metrics.

  The workdir is locked for the whole run (vlpre/workdir_lock.py), as each stage's
  folder is by its `train.run`: a second trainer changes neither the record nor a stage.
  """
  storage.path(workdir, what="workdir").mkdir(parents=True, exist_ok=True)
  with workdir_lock.held(workdir):
    return _run_stages(config, workdir, allow_config_change)


def _run_stages(config, workdir: str, allow_config_change) -> dict[str, float]:
  """`run` in a workdir this trainer holds."""
  config = config_lib.with_workdir(config, workdir)  # the stages share the run's own
  started = 0 if any(storage.path(stage_dir(workdir, i, st), what="stage folder").exists()
                     for i, st in enumerate(config.stages)) else None
  previous = run_record.read(workdir)
  changes = run_record.check_resume(config, workdir, started, allow_config_change)
  run_record.write(config, workdir, None, started, changes)
  last: dict[str, float] = {}
  try:
    for index, stage in enumerate(config.stages):
      directory = stage_dir(workdir, index, stage)
      export = os.path.join(directory, "final_params")
      if distributed.from_process_0(storage.path(export, what="stage export").is_dir()):
        logging.info("stage %d (%s) already finished: %s", index, stage.get("name"), directory)
        continue
      logging.info("stage %d (%s): %s steps in %s", index, stage.get("name"), stage["steps"],
                   directory)
      # Checked above as a whole: a stage checks only its steps against its checkpoint.
      last = train.run(stage_config(config, index, workdir), directory, export_params_to=export,
                       allow_config_change=(run_record.ANY,))
      train.release_host_memory()  # the next stage builds its own model, step and evaluators
      if train.stop_requested():
        logging.info("stop requested during stage %d (%s); rerun to resume it", index,
                     stage.get("name"))
        break
  except run_record.ResumeRefused:  # a stage's steps below its checkpoint: nothing changes
    run_record.put(workdir, previous)
    raise
  return last
