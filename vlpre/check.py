"""Fail fast: everything about a config that can be checked before a model is built.

    problems = check.check_config(config)   # [] when the config is fine

Each problem is one line, "<config field>: <what is wrong>", so a typo in a loss name,
an evaluator kind, a data glob or the mesh is reported in a second, all at once, instead
of as a traceback after minutes of model building (or, for an eval split, after the
whole training). `python -m vlpre.main --check --config=...` prints them and exits 1
(0 and "config OK" when clean); `vlpre.main` runs the same check before every run.

What is checked: the method (`model_name`), the loss names and `loss_impl`, the
evaluators' kinds and splits (their globs match files, zero-shot class names exist), the
training data (each glob matches, its first shard opens and one of its records decodes
as the input pipeline decodes it, so a wrong `caption_field`, `image_key` or `label`
shows before training), the pretrained models the config names (installed, a local
path, or a hub id allowed and pinned), the mesh against the devices, the batch against
the data-parallel axes and `accum_steps` against the per-device batch, `init_from`, and
for staged configs each stage's own config. Nothing is built, loaded or downloaded.
"""
from __future__ import annotations

from collections.abc import Sequence
import importlib.util
import os
import pkgutil
from typing import Any

import jax

from vlpre import accumulate
from vlpre import evaluators
from vlpre import losses as losses_lib
from vlpre import methods
from vlpre import profiling
from vlpre import sharding
from vlpre import stages
from vlpre import storage
from vlpre.data import eval_input
from vlpre.data import records
from vlpre.data import sources
from vlpre.data import tar_scan
from vlpre.data import train_input
from vlpre.data import transforms
from vlpre.llm import assets
from vlpre.text_encoders import recipes

_SPLIT_FIELDS = ("data", "train_data", "test_data", "images", "negatives_from")  # eval fields holding globs


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  try:
    value = cfg.get(name, default)
  except (AttributeError, TypeError):
    return default
  return default if value is None else value


def _evaluator_problem(kind: str) -> str | None:
  """Why `kind` is not an evaluator: no file vlpre/evaluators/<kind>.py, or no `Evaluator`."""
  try:
    if _defines_evaluator(kind):
      return None
  except Exception as e:  # pylint: disable=broad-except  (the file itself fails to import)
    return f"vlpre/evaluators/{kind}.py fails to import: {type(e).__name__}: {e}"
  kinds = [m.name for m in pkgutil.iter_modules(evaluators.__path__) if _defines_evaluator(m.name, True)]
  return f"no evaluator kind {kind!r} (vlpre/evaluators/{kind}.py); kinds: {', '.join(sorted(kinds))}"


def _defines_evaluator(kind: str, quiet: bool = False) -> bool:
  """Whether vlpre/evaluators/<kind>.py exists and defines `Evaluator` (helper files do not)."""
  if not kind.isidentifier() or importlib.util.find_spec(f"vlpre.evaluators.{kind}") is None:
    return False
  try:
    return hasattr(importlib.import_module(f"vlpre.evaluators.{kind}"), "Evaluator")
  except Exception:  # pylint: disable=broad-except
    if quiet:
      return False
    raise


def _method(config) -> tuple[methods.Method | None, list[str]]:
  """The config's method, or the one-line problem of its `model_name`."""
  name = _get(config, "model_name")
  if not name:
    return None, ["model_name: not set (a method folder vlpre/methods/<name>/ or a module path)"]
  try:
    return methods.get(name), []
  except ValueError as e:
    return None, [f"model_name: {e}"]
  except Exception as e:  # pylint: disable=broad-except  (the method's code fails to import)
    return None, [f"model_name: method {name!r} fails to import: {type(e).__name__}: {e}"]


def _check_losses(config, method: methods.Method | None) -> list[str]:
  weights = dict(_get(config, "losses", {}))
  available = losses_lib.available(method.losses if method else None)
  known = ", ".join(sorted(available))
  problems = [f"losses: unknown loss {name!r}; known: {known}"
              for name in weights if name not in available]
  if not any(weights.values()):
    problems.append("losses: empty or all zero; give at least one loss a weight")
  impl = _get(config, "loss_impl", "local")
  if impl not in losses_lib.LOSS_IMPLS:
    problems.append(f"loss_impl: {impl!r} is not one of {', '.join(losses_lib.LOSS_IMPLS)}")
  return problems


def _split_problem(field: str, patterns: Any, data_dir: str | None) -> tuple[str | None, list[str]]:
  """(problem or None, matched files) of a shard glob."""
  if not patterns:
    return f"{field}: no shard pattern given", []
  try:
    return None, sources._expand_patterns(patterns, data_dir)  # pylint: disable=protected-access
  except (FileNotFoundError, ValueError) as e:
    return f"{field}: {e}", []


def _check_evals(config) -> list[str]:
  problems = []
  for name, cfg in dict(_get(config, "evals", {})).items():
    kind = _get(cfg, "kind")
    if not kind:
      problems.append(f"evals.{name}: no kind")
    elif problem := _evaluator_problem(str(kind)):
      problems.append(f"evals.{name}.kind: {problem}")
    if _get(cfg, "format", "vlpre") != "vlpre":  # a clip_benchmark folder or a TFDS split
      problems += _eval_split_problem(f"evals.{name}", cfg)
    for field in _SPLIT_FIELDS:
      if field in cfg and (field != "data" or _get(cfg, "format", "vlpre") == "vlpre"):
        problem, _ = _split_problem(f"evals.{name}.{field}", cfg[field], _get(cfg, "data_dir"))
        problems += [problem] if problem else []
    if _get(cfg, "classnames"):
      problem = _classnames_problem(f"evals.{name}.classnames", cfg["classnames"],
                                    _get(cfg, "data_dir"))
      problems += [problem] if problem else []
  return problems


def _eval_split_problem(field: str, cfg: Any) -> list[str]:
  """An eval split in another format opens (`data.open_eval_split`: a folder's shard
  headers, a TFDS builder's metadata)."""
  if _get(cfg, "format") not in eval_input.EVAL_FORMATS:
    return [f"{field}.format: unknown eval format {_get(cfg, 'format')!r}; use one of "
            f"{', '.join(eval_input.EVAL_FORMATS)}"]
  try:
    eval_input.open_eval_split(cfg)
  except Exception as e:  # pylint: disable=broad-except  (TFDS raises many types)
    return [f"{field}.data: {e}".splitlines()[0]]
  return []


def _classnames_problem(field: str, folder: str, data_dir: str | None) -> str | None:
  """Zero-shot class names: `<data_dir>/<folder>/classnames.json` (eval_input.load_classnames)."""
  try:
    path = os.path.join(sources.resolve_data_dir(data_dir), folder, "classnames.json")
  except FileNotFoundError as e:
    return f"{field}: {e}"
  return None if storage.path(path).is_file() else f"{field}: {path} does not exist"


def _check_train_data(config, method: methods.Method | None) -> list[str]:
  cfg = _get(config, "input")
  if cfg is None:
    return ["input: not set"]
  kind = _get(cfg, "kind", "tar")
  data_dir = _get(cfg, "data_dir")
  if kind == "tfds":
    try:
      source = records.make_source(cfg)
    except Exception as e:  # pylint: disable=broad-except  (TFDS raises many types)
      return [f"input: TFDS dataset {_get(cfg, 'tfds_name')!r}: {e}".splitlines()[0]]
    problem = _decode_problem(f"input: TFDS dataset {_get(cfg, 'tfds_name')!r}", source, cfg)
    return [problem] if problem else []
  if kind == "tar":
    return _check_tar_patterns(cfg)
  if method is None:  # whether the method reads this kind is unknown; _method said why
    return []
  elif problem := _records_problem(kind, config, method):
    return [problem]
  elif kind == "interleaved":
    mix = float(_get(cfg, "mix", 0.0))
    fields = (["documents"] if mix < 1 else []) + (["paired"] if mix > 0 else [])
  else:  # read by the method's own records, whose fields are its business
    return []
  problems = []
  for field in fields:
    problem, files = _split_problem(f"input.{field}", _get(cfg, field), data_dir)
    if problem:
      problems.append(problem)
    elif files[0].endswith(".tar"):  # the first shard opens and lists samples
      members, faults = tar_scan.scan(files[0])
      if faults and not members:
        problems.append(f"input.{field}: {faults[0].reason}")
    elif not storage.is_uri(files[0]) and not os.access(files[0], os.R_OK):
      problems.append(f"input.{field}: {files[0]} is not readable")
  return problems


def _check_tar_patterns(cfg) -> list[str]:
  """Each glob of input.train matches, and a record of its first shard decodes as the
  training input decodes it (a wrong caption_field, image_key or label shows here)."""
  patterns = _get(cfg, "train")
  if not patterns:
    return ["input.train: no shard pattern given"]
  problems = []
  for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
    field = f"input.train {pattern!r}" if not isinstance(patterns, str) else "input.train"
    problem, files = _split_problem(field, pattern, _get(cfg, "data_dir"))
    if problem is None:
      members, faults = tar_scan.scan(files[0])
      if faults and not members:
        problem = f"{field}: {faults[0].reason}"
      else:
        problem = _decode_problem(f"{field}: {files[0]}", sources.TarShardSource(files[0]), cfg)
    problems += [problem] if problem else []
  return problems


_DECODE_TRIES = 8  # records tried: one corrupt sample must not fail a good dataset


def _decode_problem(where: str, source: Any, cfg: Any) -> str | None:
  """Why none of the first records of `source` decodes through the training input's
  decoders (image, then label or caption), or None when one does."""
  reasons = []
  for index in range(min(len(source), _DECODE_TRIES)):
    record = source[index]
    for op in train_input.decode_transforms(cfg, pick="first"):
      record = op.map(record)
    if not transforms.is_bad(record):
      return None
    reasons.append(record[transforms.BAD])
  if not reasons:
    return f"{where}: holds no sample"
  fields = "input.label" if _get(cfg, "label", False) else "input.caption_field"
  return (f"{where}: none of the first {len(reasons)} samples decodes (check input.image_key "
          f"and {fields}): {reasons[0]}")


def _records_problem(kind: str, config, method: methods.Method) -> str | None:
  """Why `method` does not read data of `kind` (neither tar nor tfds): only a method that
  builds its training records itself (`InputExtras.records`) does."""
  try:
    extras = method.input_extras(config)
  except Exception as e:  # pylint: disable=broad-except  (the method's own code)
    return (f"input.kind: {kind!r} needs the method's records, but its input_extras fails: "
            f"{type(e).__name__}: {e}").splitlines()[0]
  if extras.records is None:
    return (f"input.kind: unknown data kind {kind!r}; use 'tar' or 'tfds' (method "
            f"{method.name!r} builds no records of its own: InputExtras.records)")
  return None


def _check_assets(config, method: methods.Method | None) -> list[str]:
  """Every pretrained model the method's descriptor says its config names (`pretrained`)."""
  problems = []
  for spec in method.pretrained if method else ():
    cfg = config
    for part in spec.section.split("."):  # "<method>.llm": an LLM section inside the method's
      cfg = _get(cfg, part)
    name = _get(cfg, spec.field) if cfg is not None else None
    if not name or (spec.used is not None and not spec.used(config)):
      continue
    if spec.recipes and recipes.find(str(name)) is not None:
      continue  # a saved recipe: its folder holds the model
    problem = assets.name_problem(str(name), allow_download=bool(_get(cfg, "allow_download", False)),
                                  revision=_get(cfg, "revision"), where=spec.section)
    if problem and spec.recipes:
      problem += (f", nor a text-encoder recipe saved under {recipes.recipes_dir()} "
                  "($VLPRE_TEXT_ENCODERS)")
    if problem:
      problems.append(f"{spec.section}.{spec.field}: {problem}")
  return problems


def _check_mesh(config, devices: Sequence[Any]) -> list[str]:
  try:
    mesh = sharding.make_mesh(_get(config, "mesh", ()), devices)
  except ValueError as e:
    return [f"mesh: {e}"]
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = int(_get(config, "batch_size", 0))
  if batch_size <= 0 or batch_size % data_parallel:
    return [f"batch_size: {batch_size} is not divisible by the {data_parallel} data-parallel "
            f"devices (data × fsdp) of mesh {dict(mesh.shape)}"]
  problem = accumulate.steps_problem(batch_size // data_parallel, _get(config, "accum_steps", 1))
  return [problem] if problem else []


def _check_init_from(config) -> list[str]:
  init = _get(config, "init_from")
  problems = []
  for field, sub in (("workdir", "checkpoints"), ("params", "")):
    path = _get(init, field) if init is not None else None
    if path and "://" not in str(path) and not os.path.isdir(os.path.join(path, sub)):
      problems.append(f"init_from.{field}: {os.path.join(path, sub).rstrip('/')} does not exist")
  weights = _get(init, "weights") if init is not None else None
  if weights and not os.path.exists(os.path.expanduser(weights)):
    problems.append(f"init_from.weights: {weights} does not exist")
  return problems


def _check_hooks(config) -> list[str]:
  """profile_steps is () or (first, last); an enabled wandb section has wandb installed."""
  problems = []
  if problem := profiling.steps_problem(_get(config, "profile_steps", ())):
    problems.append(f"profile_steps: {problem}")
  wandb = _get(config, "wandb")
  if wandb is not None and _get(wandb, "enabled", False):
    if importlib.util.find_spec("wandb") is None:
      problems.append("wandb.enabled: wandb is not installed: pip install -e \".[wandb]\"")
    if _get(wandb, "mode", "offline") not in ("offline", "online", "disabled"):
      problems.append(f"wandb.mode: {_get(wandb, 'mode')!r}; use offline, online or disabled")
  return problems


def _check_one(config, devices: Sequence[Any]) -> list[str]:
  method, problems = _method(config)
  return (problems + _check_losses(config, method) + _check_evals(config)
          + _check_train_data(config, method) + _check_assets(config, method)
          + _check_mesh(config, devices) + _check_hooks(config))


def check_config(config, *, devices: Sequence[Any] | None = None) -> list[str]:
  """One line per problem of `config` (see the module docstring); [] when it is fine.

  Args:
    config: a run's config (ml_collections.ConfigDict), staged or not.
    devices: the devices the mesh must fit; default all of `jax.devices()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  problems = _check_one(config, devices) + _check_init_from(config)
  for index, stage in enumerate(_get(config, "stages", ())):
    label = f"stages[{index}] ({_get(stage, 'name', index)})"
    try:
      stage_config = stages.stage_config(config, index, workdir="")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      problems.append(f"{label}: {e}")
      continue
    problems += [f"{label}: {line}" for line in _check_one(stage_config, devices)
                 if line not in problems]
  return [" ".join(line.split()) for line in problems]  # one line each, whatever the messages
