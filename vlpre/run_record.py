"""A run that describes itself: `<workdir>/config.json`, and resumes that keep to it.

At a run's first start process 0 writes `config.json` into the workdir (local or gs://):

  config        the resolved config (config file, argument and every override applied)
  input_shapes  {batch key: {"shape", "dtype"}} of the run's first host batch: what the
                model was initialised on, so `vlpre.evaluate` builds the model without
                the training data (the batch layout is the method's: images, tokens,
                cached text embeddings, packed sequences)
  argv, written, process_count, git_commit (of the vlpre checkout; null outside one),
  git_dirty, versions (python, jax, jaxlib, flax, optax, orbax-checkpoint, grain, vlpre)
  changes       one entry per resume that accepted config changes: the step, the fields
                (old, new), argv and time; `config` then holds the new values

`vlpre.evaluate` and `vlpre.export` read the config from here when no `--config` is given
(`define_config_flag`); `--config.x=y` overrides it.

A resume (a checkpoint exists) compares the config with the record (`check_resume`). A
field that changes what the run computes (learning rate, batch size, data, seed, losses,
step count, model, ...) stops the run before anything is built, with one line naming the
fields and `--allow_config_change=...` to accept them. The fields in `RESUMABLE` change
only how the run is observed, laid out or stored, and pass. `total_steps` below the
latest checkpoint's step is refused whatever is allowed.
"""
from __future__ import annotations

from collections.abc import Sequence
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from typing import Any

from absl import flags
from absl import logging
import jax
import ml_collections as mlc
from ml_collections import config_flags
import numpy as np

from vlpre import storage

FILENAME = "config.json"
# Fields a resume may change without --allow_config_change (a name covers its subfields).
# They decide how a run is watched, laid out on devices or stored, not what it computes.
RESUMABLE = (
    "evals",                   # which evaluators run, on which sets, how often
    "workdir",                 # where the run lives (set by the tools): a moved workdir resumes
    "log_every",               # how often training metrics are logged
    "checkpoint",              # how often checkpoints are written, how many are kept, async
    "mesh",                    # the device mesh: a requeue on another slice (elastic resume)
    "sharding_rules",          # how parameters are laid out over the mesh
    "min_fsdp_size",           # which parameters must be sharded (a layout check)
    "check_fsdp_sharding",     # whether that check runs
    "input.data_dir",          # where the same shards are mounted on this machine
    "input.num_read_threads",  # decoding threads: the same batches, in the same order
    "input.prefetch_buffer_size",  # batches read ahead: the same batches
    "input.max_bad_fraction",  # how many unreadable samples are tolerated
)
ANY = "*"  # in --allow_config_change: accept every change
_VERSIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "vlpre")
_MISSING = "<absent>"


class ResumeRefused(ValueError):
  """A resume would change the run (config drift, or `total_steps` below the checkpoint)."""


def _plain(config: Any) -> dict:
  """The config as JSON values: tuples become lists, references their values."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs are written with."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def to_config(plain: dict) -> mlc.ConfigDict:
  """A recorded config as the ConfigDict that `--config` gives."""
  return mlc.ConfigDict(_tuples(plain))


def path(workdir: str):
  """Where a workdir's record is."""
  return storage.path(workdir, what="workdir") / FILENAME


def read(workdir: str) -> dict | None:
  """The workdir's record; None when it has none (a new run, or one from before records)."""
  file = path(workdir)
  if not file.exists():
    return None
  try:
    return json.loads(file.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON ({e}); restore it or remove it") from e


def load_config(workdir: str) -> mlc.ConfigDict:
  """The config a run recorded (FileNotFoundError with one line when it recorded none)."""
  record = read(workdir)
  if record is None:
    raise FileNotFoundError(f"{path(workdir)} not found (a run records its config at its first "
                            "start): give --config, as the run was started with")
  return to_config(record["config"])


def input_batch(workdir: str) -> dict[str, np.ndarray] | None:
  """Zeros in the recorded shapes of the run's first batch (None: none recorded), on which
  `train_state.setup` initialises the same model without reading any data."""
  record = read(workdir)
  if not record or not record.get("input_shapes"):
    return None
  return {k: np.zeros(v["shape"], v["dtype"]) for k, v in record["input_shapes"].items()}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  """{"optim.lr": 1e-3, "stages.0.steps": 300, ...}: leaves of dicts and lists of dicts."""
  if isinstance(value, dict) and value:
    out = {}
    for key, child in value.items():
      out.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return out
  if isinstance(value, list) and any(isinstance(v, dict) for v in value):
    out = {f"{prefix}.#": len(value)}  # a stage added or removed
    for i, child in enumerate(value):
      out.update(flatten(child, f"{prefix}.{i}"))
    return out
  return {prefix: value}


def changed_fields(recorded: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (recorded value, current value)} for every leaf that differs, in order."""
  old, new = flatten(recorded), flatten(current)
  fields = list(old) + [k for k in new if k not in old]
  # Compared as JSON text, so that a NaN equals itself.
  return {k: (old.get(k, _MISSING), new.get(k, _MISSING)) for k in fields
          if json.dumps(old.get(k, _MISSING)) != json.dumps(new.get(k, _MISSING))}


def is_allowed(field: str, allowed: Sequence[str]) -> bool:
  """Whether `field` is one of `allowed` or under one ("optim" covers "optim.lr"); a
  stage's field also as the field it sets ("stages.1.evals.x" as "evals.x")."""
  names = (field, re.sub(r"^stages\.\d+\.", "", field))
  return any(a == ANY or n == a or n.startswith(a + ".") for a in allowed for n in names)


def _short(value: Any) -> str:
  text = value if value == _MISSING else json.dumps(value)
  return text if len(text) <= 40 else text[:37] + "..."


def check_resume(config, workdir: str, step: int | None,
                 allow: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
  """Compares a resume's config with the record; returns every change, for `write`.

  `step`: the checkpoint the run resumes from (None: a fresh start, nothing to check).
  Raises `ResumeRefused` (one line) for a change outside `RESUMABLE` and `allow`, and for
  `total_steps` below `step`.
  """
  if step is None:
    return {}
  record = read(workdir)
  changes = {} if record is None else changed_fields(record["config"], _plain(config))
  refused = [f for f in changes if not is_allowed(f, (*RESUMABLE, *allow))]
  if refused:
    listed = ", ".join(f"{f} ({_short(changes[f][0])} -> {_short(changes[f][1])})"
                       for f in refused)
    raise ResumeRefused(
        f"the config differs from the one this run recorded in {path(workdir)} in {listed}; "
        f"resuming with it would silently change the run. Rerun with "
        f"--allow_config_change={','.join(refused)} (train.run's allow_config_change) to "
        "accept the change, or use a new workdir")
  total = config.get("total_steps")
  if total is not None and not config.get("stages") and step > total:
    raise ResumeRefused(
        f"total_steps {total} is below step {step} of the latest checkpoint in {workdir}: the "
        f"run is past that end already. Give total_steps >= {step}, or a new workdir for a "
        "shorter run")
  accepted = {f: v for f, v in changes.items() if not is_allowed(f, RESUMABLE)}
  if accepted:
    logging.warning("resuming from step %d with config changes accepted by "
                    "--allow_config_change: %s", step, ", ".join(accepted))
  return changes


def _git() -> tuple[str | None, bool | None]:
  """(commit, uncommitted changes) of the checkout vlpre runs from; (None, None) outside one."""
  package = os.path.dirname(os.path.abspath(__file__))

  def git(*args):
    return subprocess.run(["git", "-C", package, *args], capture_output=True, text=True,
                          timeout=10, check=False)
  try:
    top = git("rev-parse", "--show-toplevel")
    if top.returncode or os.path.realpath(os.path.join(top.stdout.strip(), "vlpre")) != \
        os.path.realpath(package):  # e.g. installed into a venv that sits in another checkout
      return None, None
    commit = git("rev-parse", "HEAD").stdout.strip() or None
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    return commit, dirty
  except (OSError, subprocess.SubprocessError):  # no git on the machine
    return None, None


def _versions() -> dict[str, str | None]:
  versions: dict[str, str | None] = {"python": platform.python_version()}
  for name in _VERSIONS:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def describe(config, example_batch: dict | None = None) -> dict:
  """The record of a run started now with `config` (module docstring)."""
  commit, dirty = _git()
  shapes = {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
            for k, v in (example_batch or {}).items()
            if not k.startswith("_") and np.asarray(v).dtype != object}
  return {"config": _plain(config), "input_shapes": shapes, "argv": list(sys.argv),
          "written": _now(), "process_count": jax.process_count(), "git_commit": commit,
          "git_dirty": dirty, "versions": _versions(), "changes": []}


def write(config, workdir: str, example_batch: dict | None, step: int | None,
          changes: dict[str, tuple[Any, Any]]) -> None:
  """Process 0 records the run: at a fresh start (replacing the record of a run that never
  saved a checkpoint), at the first resume of a run with no record, and after a resume
  with `changes` (from `check_resume`: the config is updated, the change appended)."""
  if jax.process_index() != 0:
    return
  record = read(workdir)
  if step is None or record is None:
    record = describe(config, example_batch)
    if step:
      record["recorded_at_step"] = step  # a run from before records: its start is unknown
  elif changes:
    record["config"] = _plain(config)
    record.setdefault("changes", []).append(
        {"step": step, "fields": {f: list(v) for f, v in changes.items()},
         "argv": list(sys.argv), "written": _now()})
  else:
    return
  put(workdir, record)
  logging.info("recorded the run's config in %s", path(workdir))


def put(workdir: str, record: dict | None) -> None:
  """Writes `record` as the workdir's config.json whole (None: removes it)."""
  if jax.process_index() != 0:
    return
  file = path(workdir)
  if record is None:
    if file.exists():
      file.unlink()
    return
  file.parent.mkdir(parents=True, exist_ok=True)
  storage.write_atomic(file, json.dumps(record, indent=1) + "\n")


def _argv_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=value` / `--name value` in argv (None when absent)."""
  for i, arg in enumerate(argv):
    stripped = arg.lstrip("-")
    if arg.startswith("-") and stripped == name:
      return argv[i + 1] if i + 1 < len(argv) else ""
    if arg.startswith("-") and stripped.startswith(name + "="):
      return stripped[len(name) + 1:]
  return None


def define_config_flag(argv: Sequence[str], workdir_flag: str = "workdir",
                       flag_values: flags.FlagValues = flags.FLAGS):
  """`--config` for a tool that reads a run: a config file as `vlpre.main` takes it, or,
  without one, the config recorded in `--workdir`'s config.json; `--config.x=y`
  overrides either. A missing record is one line on stderr and exit 1."""
  workdir = _argv_value(argv, workdir_flag)
  if _argv_value(argv, "config") is not None or not workdir:  # no workdir: absl says so
    return config_flags.DEFINE_config_file(
        "config", None, "Config file of the run (default: the workdir's config.json).",
        flag_values=flag_values, sys_argv=list(argv))
  try:
    config = load_config(workdir)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(str(e))
  return config_flags.DEFINE_config_dict(
      "config", config, f"The run's config, from {path(workdir)}; --config.x=y overrides.",
      flag_values=flag_values, sys_argv=list(argv))
