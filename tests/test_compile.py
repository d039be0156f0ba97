"""vlpre.compile: (slow, with libtpu) every method's full-width step compiled for a small
TPU slice on this CPU host; the analysis it reports is tested in test_step_analysis.py."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from bench import gpt4image_stand_in
from bench import shapes_only_llm
from vlpre import compile as compile_lib
from vlpre import config_lib
from vlpre.data import interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='libtpu is not installed (pip install -e ".[compile]")')


def test_without_remat_turns_every_remat_field_off():
  config = config_lib.load(os.path.join(ROOT, "configs", "clip.py"))
  assert config.model.image.remat is True
  plain = compile_lib.without_remat(config)
  assert plain.model.image.remat is False and plain.model.text.remat is False
  assert config.model.image.remat is True  # the config itself is untouched


def test_the_compilers_out_of_memory_errors_become_one_line_with_the_knob():
  config = config_lib.load(os.path.join(ROOT, "configs", "clip.py"))  # fsdp 1
  not_fit = compile_lib._not_fit_line  # pylint: disable=protected-access
  temporaries = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                 "HLO temporaries (373.86G) exceeds available HBM (15.75G).")
  assert not_fit(temporaries, "clip", config, 64) == (
      "clip: does not fit: 358.11 GiB per chip over the 15.75 GiB of HBM; lower "
      "--config.batch_size or turn on remat in config.model")
  total = ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.10G of 15.75G hbm. "
           "Exceeded hbm capacity by 4.35G. Memory usage report: ...")
  line = not_fit(total, "clip", config, 64)
  assert line.startswith("clip: does not fit: 4.35 GiB per chip over the 15.75 GiB of HBM; "
                         "shard the weights and optimiser state over fsdp: --config.mesh="
                         "'((\"data\", -1), (\"fsdp\", 8), (\"tensor\", 1))'")
  # The fsdp size offered divides the slice: a 4-chip slice cannot take fsdp 8.
  assert "(\"fsdp\", 4)" in not_fit(total, "clip", config, 4)
  assert "(\"fsdp\", 2)" in not_fit(total, "clip", config, 6)
  assert not_fit("INTERNAL: other", "clip", config, 64) is None


def test_topology_errors_are_one_line():
  assert compile_lib.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
  for bad in ("v9:2x2", "v5e", "v5e:8", "v5e:8x8x8x8"):
    with pytest.raises(compile_lib.CompileError, match="expected GENERATION"):
      compile_lib.parse_topology(bad)


def test_without_libtpu_one_line_names_the_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  line = compile_lib.libtpu_missing()
  assert "\n" not in line and 'pip install -e ".[compile]"' in line and "libtpu==0.0.42" in line


# Each method's full-size config at its real width and depth, the batch cut to 8 per chip
# of a v5e:2x2 slice (the layer loops are scanned: the TPU compiler compiles one block per
# stack, so depth costs little compile time); staged configs: their last stage (everything
# trains). LIFT compiles its online step (the cached one and centring read the embedding
# store, which `vlpre.embed` builds in ~20 min), with SmolLM2 and with a 7B-class embedder
# (Mistral-7B's shapes, bench/shapes_only_llm.py: no weights exist or are read), sharded
# over fsdp. GPT4Image's full size reads ImageNet and LLM-written descriptions, which this
# machine does not have: CIFAR-10 images, decoded to the config's 224 px, and a store of
# one-line descriptions stand in (bench/gpt4image_stand_in.py; the shapes are the config's).
_FULL_SIZE = {
    "clip": ("configs/clip.py", {}),
    "siglip": ("configs/siglip.py", {}),
    "lit": ("configs/lit.py", {}),
    "lift_online": ("configs/lift.py", {"text_mode": "online", "text_encoder.center": False}),
    "lift_online_7b": ("configs/lift.py", {"text_mode": "online", "text_encoder.center": False,
                                           "mesh": (("data", 1), ("fsdp", 4), ("tensor", 1))}),
    "lcl": ("configs/lcl.py", {}),
    "hive": ("configs/hive.py", {}),
    "bridge": ("configs/bridge.py", {}),
    "gpt4image_resnet50": ("configs/gpt4image.py:resnet50", {}),
    "gpt4image_deit_s": ("configs/gpt4image.py:deit_s", {}),
}


def _full_size(name: str, batch_size: int, tmp_path, data_dir):
  path, overrides = _FULL_SIZE[name]
  config = config_lib.load(os.path.join(ROOT, path))
  config.batch_size = batch_size
  if name.startswith("gpt4image"):
    overrides = {**overrides, **gpt4image_stand_in.write(str(tmp_path / "stand_in"), path,
                                                         data_dir=data_dir)}
  for field, value in overrides.items():
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
  if config.get("stages"):
    config.stages = config.stages[-1:]
  if config.input.get("documents"):  # LCL's interleaved documents, built from Flickr8k pairs
    config.input.documents = str(tmp_path / "train.jsonl")
    interleaved.build_flickr_interleaved(data_dir, config.input.documents)
  if name.endswith("_7b"):
    config.text_encoder.name = shapes_only_llm.write(
        str(tmp_path / "mistral-7b-shapes"), shapes_only_llm.PRESETS["mistral-7b"])
  return config


# The TPU compiler takes 0.5–2 min of 2 cores per full-size step: the suite compiles three
# unlike ones (a contrastive pair of towers; a frozen LLM inside the step; an LLM captioner,
# staged), and lowers every method's step for the slice (the abstract build, its shardings
# and the StableHLO), which is what differs between methods. docs/scaling.md's table has
# every config compiled, with the command.
_COMPILED = ("clip", "lift_online", "hive")


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("name", _COMPILED)
def test_full_size_step_compiles_for_a_v5e_slice(name, tmp_path, data_dir):
  config = _full_size(name, 32, tmp_path, data_dir)
  reports = compile_lib.compile_config(config, "v5e:2x2", name=name)
  assert len(reports) == 1
  r = reports[0]
  print(compile_lib.format_report(r))
  assert r.chips == 4 and r.hbm_bytes == 16 * 2**30
  assert 0 < r.argument_bytes and 0 < r.temp_bytes and 0 < r.total_bytes < r.hbm_bytes
  assert r.model_flops > 0 and r.executed_flops >= r.model_flops
  assert r.roofline_seconds > 0 and 0 < r.mfu_bound <= 1
  assert r.images_per_second_per_chip == pytest.approx(32 / r.roofline_seconds / 4)
  # Data parallelism over 4 chips: the gradients are summed across them.
  assert r.collectives["all-reduce"]["count"] + r.collectives["reduce-scatter"]["count"] > 0


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("name", sorted(set(_FULL_SIZE) - set(_COMPILED)))
def test_full_size_step_lowers_for_a_v5e_slice(name, tmp_path, data_dir):
  config = _full_size(name, 32, tmp_path, data_dir)
  step = compile_lib.trace_step(config, "v5e:2x2")
  assert [d.platform for d in step.devices] == ["tpu"] * 4
  assert step.model_flops > 0 and step.executed_flops >= step.model_flops
  assert step.mesh.devices.size == 4
  text = step.traced.lower().as_text()
  # The config's mesh over the slice's 4 chips, and shardings on the step's values.
  mesh_line = next(line for line in text.splitlines() if "sdy.mesh @mesh" in line)
  assert all(f'"{axis}"={size}' in mesh_line for axis, size in step.mesh.shape.items())
  assert text.count("sdy.sharding") > 10
  if name.endswith("_7b"):  # 7B parameters' worth of matmuls per caption token, forward only
    assert step.model_flops > 2 * 6.5e9 * 32 * 10


@needs_libtpu
def test_two_processes_on_one_host_each_make_a_slice():
  """libtpu keeps one process per host unless told otherwise; compiling opens no chip, so a
  second compile (another test's subprocess, or a check on a TPU VM that is training) works."""
  assert len(compile_lib.tpu_devices("v5e:2x2")) == 4  # this process now holds libtpu
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run(
      [sys.executable, "-c", "from vlpre import compile; print(len(compile.tpu_devices('v4:2x2x1')))"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-1] == "4"


@pytest.mark.slow
@needs_libtpu
def test_a_step_over_the_chips_hbm_is_one_line_and_exit_1():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run(
      [sys.executable, "-m", "vlpre.compile", "--config=configs/clip.py",
       "--topology=v5e:2x2", "--config.batch_size=131072"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 1, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  # The compiler's own figure: 15.75 GiB of a v5e chip's 16 are available to a program.
  assert re.fullmatch(r"configs/clip.py: does not fit: [\d.]+ GiB per chip over the 15.75 GiB "
                      r"of HBM; lower --config.batch_size or turn on remat in config.model",
                      line), line


@pytest.mark.integration
def test_without_libtpu_the_command_says_what_to_install(tmp_path):
  """A stand-in `libtpu` that cannot be found: the command's one line and exit status 1."""
  shadow = tmp_path / "sitecustomize.py"
  shadow.write_text("import importlib.util as u\n_f = u.find_spec\n"
                    "u.find_spec = lambda n, *a: None if n == 'libtpu' else _f(n, *a)\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT,
                                                     os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-m", "vlpre.compile", "--config=configs/clip.py",
                           "--topology=v5e:2x2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'pip install -e ".[compile]"' in lines[0], result.stderr
