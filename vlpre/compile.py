"""Compiles a config's real train step for a TPU slice on this (CPU) host: fits? how fast?

    python -m vlpre.compile --config=configs/clip.py --topology=v5e:8x8
    python -m vlpre.compile --config=configs/lift.py --topology=v5p:4x4x4 --config.batch_size=8192
    python -m vlpre.compile --config=configs/clip.py --topology=v4:2x2x4 --json=clip_v4.json

Needs libtpu, the TPU compiler (`pip install -e ".[compile]"`); no TPU. `train_state.setup(...,
abstract=True)` builds the trainer's own state, shardings, frozen-parameter argument and
step (the config's mesh, scan, remat and dtype) from shapes alone: no weight is
materialised. The step is lowered on `jax.ShapeDtypeStruct`s placed on the slice's devices
(`jax.experimental.topologies`) and compiled by the TPU compiler, which then reports:

  memory      per chip, from `memory_analysis()`: arguments (state, frozen weights, batch),
              outputs, temporaries (activations, gradients) and code; total = arguments +
              outputs − aliased (the donated state) + temporaries + code, against the chip's HBM.
  step time   a roofline: the largest of three lower bounds, each on the step's time
              per chip: the compiler's own estimate (`cost_analysis()["optimal_seconds"]`),
              executed FLOPs ÷ peak and bytes accessed ÷ HBM bandwidth. XLA's cost analysis
              counts a loop body once (a scanned stack of 12 layers as one layer), so the
              FLOPs come from the step's jaxpr instead, scans times their length.
  MFU bound   model FLOPs ÷ (roofline × chips × peak bf16 FLOP/s). Model FLOPs: the matmuls
              and convolutions of the same step built without remat (what MFU divides);
              executed FLOPs count the recomputation too.
  images/s    per chip, at the roofline step time.
  collectives every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute
              of the compiled HLO: how many run per step (those in a loop body once per
              iteration) and the bytes of their results.

Staged configs compile every stage (or `--stage=N`). A step that does not fit is one line
(by how much, which knob to turn) and exit status 1; so is a host without libtpu.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
import jax
from jax.experimental import topologies
import ml_collections as mlc
from ml_collections import config_flags
import numpy as np

from vlpre import check
from vlpre import config_lib
from vlpre import data as data_lib
from vlpre import llm as llm_lib
from vlpre import methods
from vlpre import metrics as metrics_lib
from vlpre import sharding
from vlpre import stages
from vlpre import step_analysis
from vlpre import train_state
from vlpre.nn import platform

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip (what a topology's dimensions count): HBM, peak dense bf16 FLOP/s, HBM
  bandwidth, the `device_kind` the TPU compiler reports, and the Cloud TPU slice name's
  prefix and TensorCores per chip (a v4-32 slice is 16 chips)."""
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  device_kind: str
  slice_prefix: str
  cores_per_chip: int


# Per chip, from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/<gen>):
CHIPS = {
    # v4: 32 GiB HBM2, 275 TFLOP/s bf16, 1,200 GB/s; two TensorCores as one megacore device.
    "v4": Chip(32 * GiB, 275e12, 1200e9, "TPU v4", "v4", 2),
    # v5e: 16 GiB HBM2, 197 TFLOP/s bf16, 819 GB/s; one TensorCore.
    "v5e": Chip(16 * GiB, 197e12, 819e9, "TPU v5 lite", "v5litepod", 1),
    # v5p: 95 GiB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s; two TensorCores as one megacore device.
    "v5p": Chip(95 * GiB, 459e12, 2765e9, "TPU v5", "v5p", 2),
    # v6e (Trillium): 32 GiB HBM, 918 TFLOP/s bf16, 1,640 GB/s; one TensorCore.
    "v6e": Chip(32 * GiB, 918e12, 1640e9, "TPU v6 lite", "v6e", 1),
}


class CompileError(Exception):
  """A problem the command reports in one line (exit status 1)."""


def libtpu_missing() -> str | None:
  """The one line to print when the TPU compiler is not installed; None when it is."""
  if importlib.util.find_spec("libtpu") is not None:
    return None
  return ('vlpre.compile needs libtpu, the TPU compiler (no TPU needed): '
          'pip install -e ".[compile]"  (libtpu==0.0.42.*, the version jax[tpu]==0.10.2 pins)')


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """"v5e:8x8" → ("v5e", (8, 8)): a generation of CHIPS and the slice's chip grid."""
  generation, _, dims = name.partition(":")
  if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", dims):
    raise CompileError(f"--topology={name!r}: expected GENERATION:AxB or AxBxC with a "
                       f"generation of {sorted(CHIPS)}, e.g. v5e:8x8, v4:2x2x4, v5p:4x4x4")
  return generation, tuple(int(d) for d in dims.split("x"))


def tpu_devices(topology: str) -> list[jax.Device]:
  """The slice's devices (one per chip), compile-only, from libtpu on this host."""
  generation, dims = parse_topology(topology)
  chip = CHIPS[generation]
  # Tell libtpu which slice this is, so it does not look for TPU hardware or a Cloud TPU
  # metadata server (it would print errors about both, then work anyway).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        f"{chip.slice_prefix}-{math.prod(dims) * chip.cores_per_chip}")
  # Compiling opens no chip, so it need not hold libtpu's one-process-per-host lock: a
  # second compile (or a compile on a TPU VM that is training) would otherwise fail on it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4's TensorCores are one device per chip only as a megacore (v5p's are by default).
  options = {"chip_config_name": "megacore"} if generation == "v4" else {}
  try:
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                           **options).devices
  except Exception as e:  # pylint: disable=broad-except  (libtpu's errors have no common type)
    raise CompileError(f"--topology={topology}: libtpu cannot make this slice: "
                       f"{str(e).splitlines()[0]}") from e
  if devices[0].device_kind != chip.device_kind:
    raise CompileError(f"--topology={topology}: libtpu made {devices[0].device_kind} devices, "
                       f"not {chip.device_kind}")
  return list(devices)


def abstract_batch(config, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch's shapes and dtypes, sharded as the trainer shards it.

  One example is read through the config's own input pipeline (its method's extras
  included), so every key, length and dtype is the trainer's; only the leading dimension
  becomes `config.batch_size`. Text stays padded to its full length, the worst case for
  memory (a method's `batch_transform` may trim it per batch).
  """
  extras = methods.input_extras(config)
  tokenizer = methods.build_tokenizer(config)
  input_cfg = mlc.ConfigDict(config.input.to_dict())
  input_cfg.num_workers = 0  # one example: no worker processes
  dataset = data_lib.build_train_dataset(
      input_cfg, global_batch_size=1, seed=config.seed,
      tokenizer=tokenizer if extras.tokenize else None, extra_transforms=extras.transforms,
      extra_keys=extras.keys, stream=extras.stream, records=extras.records)
  example = next(iter(dataset))
  batch_sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((config.batch_size, *np.shape(v)[1:]), np.asarray(v).dtype,
                                  sharding=batch_sh)
          for k, v in example.items() if not k.startswith("_")}


def without_remat(config) -> mlc.ConfigDict:
  """A copy of `config` whose every `remat` field is off: the model's FLOPs, no recompute."""
  config = copy.deepcopy(config)

  def visit(node):
    with node.unlocked():
      for key, value in node.items():
        if key == "remat":
          node[key] = False if isinstance(value, bool) else "none"
        elif isinstance(value, mlc.ConfigDict):
          visit(value)
  visit(config)
  return config


@dataclasses.dataclass
class StepReport:
  """What `compile_step` found for one step on one slice (all figures per chip unless said)."""
  config: str
  topology: str
  chips: int
  mesh: dict[str, int]
  batch_size: int
  hbm_bytes: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  compiler_seconds: float | None  # cost_analysis()["optimal_seconds"]: loop bodies once
  bytes_accessed: float           # cost_analysis(), per chip, loop bodies once
  executed_flops: float           # the whole step (every chip), scans × length, remat included
  model_flops: float              # the same without remat
  roofline_seconds: float
  mfu_bound: float
  images_per_second_per_chip: float
  collectives: dict[str, dict[str, int]]
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)


def _trace_step(s: train_state.Setup, batch, rng):
  with sharding.active(s.mesh, s.rules):
    return s.jit_train_step().trace(s.state, s.frozen, batch, rng)


@dataclasses.dataclass(frozen=True)
class TracedStep:
  """`config`'s train step traced for a slice, before the TPU compiler sees it."""
  traced: jax.stages.Traced
  config: mlc.ConfigDict  # as traced (init_from dropped)
  devices: list
  mesh: jax.sharding.Mesh
  executed_flops: float   # the step's jaxpr, scans × length, remat included
  model_flops: float      # the same step built without remat


def trace_step(config, topology: str) -> TracedStep:
  """Builds `config`'s step abstractly on `topology`'s devices and traces it; raises
  CompileError for a config the checks refuse (a mesh that does not fit the slice)."""
  devices = tpu_devices(topology)
  # init_from's weights replace values, not shapes: none is read. The evaluators do not
  # run in the step: their sets (ImageNet val for a full-size config) need not be here.
  config = copy.deepcopy(config)
  with config.unlocked():
    if "init_from" in config:
      del config["init_from"]
    config.evals = {}
  problems = check.check_config(config, devices=devices)
  if problems:
    raise CompileError("; ".join(problems))
  mesh = sharding.make_mesh(config.mesh, devices)
  # A pretrained model's weights are never read (a 7B folder needs only its config and
  # tokenizer), the example batch's tokenizer included.
  with llm_lib.abstract_weights():
    batch = abstract_batch(config, mesh)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  with platform.target("tpu"):  # the layer loop and attention as a TPU run builds them
    s = train_state.setup(config, batch, mesh=mesh, abstract=True)
    traced = _trace_step(s, batch, rng)
    plain = train_state.setup(without_remat(config), batch, mesh=mesh, abstract=True)
    model = step_analysis.jaxpr_flops(_trace_step(plain, batch, rng).jaxpr)
  return TracedStep(traced=traced, config=config, devices=devices, mesh=mesh,
                    executed_flops=step_analysis.jaxpr_flops(traced.jaxpr), model_flops=model)


def compile_step(config, topology: str, *, label: str = "") -> StepReport:
  """Lowers and compiles `config`'s train step for `topology`; raises CompileError when it
  cannot (a bad config, a mesh that does not fit the slice, a step over the chip's HBM)."""
  generation, _ = parse_topology(topology)
  chip = CHIPS[generation]
  step = trace_step(config, topology)
  config, devices, mesh = step.config, step.devices, step.mesh
  executed, model = step.executed_flops, step.model_flops
  # A TPU executable is of no use to this CPU host's persistent compilation cache (it
  # cannot be loaded back here): the compile bypasses it.
  cache_was_on = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  start = time.perf_counter()
  try:
    compiled = step.traced.lower().compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError and kin)
    raise CompileError(_not_fit_line(str(e), label or topology, config, len(devices)) or
                       f"{label or topology}: the TPU compiler failed: "
                       f"{' '.join(str(e).split())[:500]}") from e
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was_on)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  chips = len(devices)
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  optimal = cost.get("optimal_seconds")
  bounds = [executed / chips / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth]
  if optimal is not None and optimal > 0:
    bounds.append(float(optimal))
  roofline = max(bounds)
  report = StepReport(
      config=label, topology=topology, chips=chips, mesh=dict(mesh.shape),
      batch_size=int(config.batch_size), hbm_bytes=chip.hbm_bytes,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes),
      compiler_seconds=None if optimal is None else float(optimal),
      bytes_accessed=bytes_accessed, executed_flops=executed, model_flops=model,
      roofline_seconds=roofline, mfu_bound=model / (roofline * chips * chip.peak_flops),
      images_per_second_per_chip=config.batch_size / roofline / chips,
      collectives=step_analysis.hlo_collectives(compiled.as_text()), compile_seconds=seconds)
  if report.total_bytes > chip.hbm_bytes:
    raise CompileError(_over_line(report.total_bytes - chip.hbm_bytes, chip.hbm_bytes,
                                  label or topology,
                                  _knob(config, activations=False, chips=chips)))
  return report


_ACTIVATIONS = "lower --config.batch_size or turn on remat in config.model"


def _knob(config, activations: bool, chips: int) -> str:
  """Which config field to turn first: fsdp when the state is not sharded, unless the
  compiler says the temporaries (activations, gradients) alone are too large. The fsdp
  size offered divides the slice: all its chips up to 8 (a host's chips on a pod)."""
  if activations or int(dict(config.mesh).get("fsdp", 1)) != 1:
    return _ACTIVATIONS
  fsdp = next(n for n in (8, 4, 2, 1) if chips % n == 0)
  return ("shard the weights and optimiser state over fsdp: --config.mesh='((\"data\", -1), "
          f"(\"fsdp\", {fsdp}), (\"tensor\", 1))', or {_ACTIVATIONS}")


def _over_line(excess: int, available: int, where: str, knob: str) -> str:
  return (f"{where}: does not fit: {excess / GiB:.2f} GiB per chip over the "
          f"{available / GiB:.2f} GiB of HBM; {knob}")


_SIZE = r"([\d.]+)([KMGT]?)"


def _bytes_of(number: str, unit: str) -> int:
  return int(float(number) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def _not_fit_line(message: str, where: str, config, chips: int) -> str | None:
  """The TPU compiler's out-of-memory error as one line; None for any other error. It says
  either "Exceeded hbm capacity by 3.2G" or, when the temporaries alone are too large,
  "required for HLO temporaries (373.86G) exceeds available HBM (15.75G)"."""
  if match := re.search(rf"Used {_SIZE} of {_SIZE} hbm. Exceeded hbm capacity by {_SIZE}",
                        message):
    groups = match.groups()
    return _over_line(_bytes_of(*groups[4:]), _bytes_of(*groups[2:4]), where,
                      _knob(config, activations=False, chips=chips))
  if match := re.search(rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)",
                        message):
    required, available = _bytes_of(*match.groups()[:2]), _bytes_of(*match.groups()[2:])
    return _over_line(required - available, available, where,
                      _knob(config, activations=True, chips=chips))
  return None


def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def format_report(r: StepReport) -> str:
  """The report as aligned text lines."""
  lines = [
      f"{r.config} on {r.topology}: {r.chips} chips, mesh {r.mesh}, batch {r.batch_size} "
      f"(compiled in {r.compile_seconds:.0f} s)",
      f"  memory per chip: {_gib(r.total_bytes)} of {_gib(r.hbm_bytes)} HBM "
      f"({r.total_bytes / r.hbm_bytes:.0%}): arguments {_gib(r.argument_bytes)}, outputs "
      f"{_gib(r.output_bytes)} (aliased {_gib(r.alias_bytes)}), temporaries "
      f"{_gib(r.temp_bytes)}, code {_gib(r.code_bytes)}",
      f"  step time (roofline): {r.roofline_seconds:.3f} s; compiler estimate "
      + (f"{r.compiler_seconds:.3f} s" if r.compiler_seconds and r.compiler_seconds > 0
         else "none")
      + f" (loop bodies once), executed {r.executed_flops / 1e12:.1f} TFLOP "
      f"(model {r.model_flops / 1e12:.1f} TFLOP) over {r.chips} chips, "
      f"{r.bytes_accessed / 1e9:.1f} GB accessed per chip (loop bodies once)",
      f"  MFU bound: {r.mfu_bound:.1%}; images/s per chip: {r.images_per_second_per_chip:,.0f}",
      "  collectives per step (count, bytes per chip):"]
  for op, found in r.collectives.items():
    lines.append(f"    {op:<19} {found['count']:>6}  {found['bytes'] / 1e9:9.3f} GB")
  return "\n".join(lines)


def compile_config(config, topology: str, *, name: str = "",
                   stage: int | None = None) -> list[StepReport]:
  """Every stage of a staged config (or the one `stage`), else the one step."""
  if not config.get("stages"):
    return [compile_step(config, topology, label=name)]
  indices = range(len(config.stages)) if stage is None else [stage]
  return [compile_step(stages.stage_config(config, i, workdir=""), topology,
                       label=f"{name} stage {i} ({config.stages[i].get('name', i)})")
          for i in indices]


def main(argv, config_flag, topology_flag, stage_flag, json_flag, verbose_flag):
  del argv
  missing = libtpu_missing()
  if missing:
    print(missing, file=sys.stderr)
    sys.exit(1)
  jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices; nothing runs here
  metrics_lib.quiet_console(verbose=verbose_flag.value)
  try:
    reports = compile_config(config_flag.value, topology_flag.value,
                             name=_config_argument(), stage=stage_flag.value)
  except (CompileError, ValueError, FileNotFoundError) as e:
    if verbose_flag.value:
      raise
    print(" ".join(str(e).split()), file=sys.stderr)
    sys.exit(1)
  for report in reports:
    print(format_report(report))
  if json_flag.value:
    with open(json_flag.value, "w") as f:
      json.dump([dict(dataclasses.asdict(r), total_bytes=r.total_bytes) for r in reports], f,
                indent=1)


def _config_argument() -> str:
  """The --config value as typed ("configs/clip.py:tiny"), to name the reports."""
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return "config"


if __name__ == "__main__":
  # Flags are defined here, not at import: tests import this module beside vlpre.main.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (see configs/).")
  _TOPOLOGY = flags.DEFINE_string(
      "topology", None, f"TPU slice: GENERATION:AxB[xC], GENERATION one of {sorted(CHIPS)}, "
      "e.g. v5e:8x8, v4:2x2x4, v5p:4x4x4")
  _STAGE = flags.DEFINE_integer("stage", None, "Staged configs: compile only this stage.")
  _JSON = flags.DEFINE_string("json", None, "Also write the reports here, as JSON.")
  _VERBOSE = flags.DEFINE_bool("verbose_logs", False,
                               "Tracebacks and every library's INFO lines.")
  flags.mark_flags_as_required(["config", "topology"])
  app.run(lambda argv: main(argv, _CONFIG, _TOPOLOGY, _STAGE, _JSON, _VERBOSE),
          flags_parser=config_lib.parse_flags)
