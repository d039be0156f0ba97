"""vlpre.compile: the HLO collective count, the FLOP count, and (slow, with libtpu) every
method's full-width step compiled for a small TPU slice on this CPU host."""
import importlib.util
import os
import re
import subprocess
import sys

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import pytest

from vlpre import compile as compile_lib
from vlpre import config_lib
from vlpre import sharding
from vlpre.data import interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='libtpu is not installed (pip install -e ".[compile]")')


def _mesh():
  return sharding.make_mesh((("data", 2), ("fsdp", 4)), jax.devices())


def test_collectives_of_a_sharded_matmul_gradient_counted_per_loop_iteration():
  """An fsdp gradient: weights gathered for the matmul, the gradient reduced; inside a
  scan of 3 steps every collective runs 3 times, and its bytes with it."""
  mesh = _mesh()
  w_sh = NamedSharding(mesh, P("fsdp", None))
  x_sh = NamedSharding(mesh, P(("data", "fsdp"), None))

  def grad_of(steps):
    def loss(w, x):
      def body(h, _):
        return jnp.tanh(h @ w), None
      return jnp.sum(jax.lax.scan(body, x, None, length=steps)[0] ** 2)
    return jax.jit(jax.grad(loss), in_shardings=(w_sh, x_sh), out_shardings=w_sh)

  args = (jax.ShapeDtypeStruct((64, 64), jnp.float32), jax.ShapeDtypeStruct((32, 64), jnp.float32))
  once = compile_lib.hlo_collectives(grad_of(1).lower(*args).compile().as_text())
  thrice = compile_lib.hlo_collectives(grad_of(3).lower(*args).compile().as_text())
  assert set(once) == set(compile_lib.COLLECTIVES)
  moved = {op: c for op, c in once.items() if c["count"]}
  assert moved, once
  assert all(c["bytes"] > 0 for c in moved.values())
  # The loop's collectives run 3× (ops outside the loop, if any, once): strictly more.
  assert sum(c["count"] for c in thrice.values()) > sum(c["count"] for c in once.values())


def test_collective_parser_on_written_hlo():
  hlo = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ag = f32[16,4]{1,0} all-gather(%x), dimensions={0}
  %ar = f32[8,4]{1,0} all-reduce(%x), to_apply=%add
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: bf16[2,3]) -> bf16[4,3] {
  %a = bf16[2,3]{1,0} parameter(0)
  %w = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body
  %s = (bf16[2,3]{1,0}, bf16[4,3]{1,0}) all-gather-start(%a), dimensions={0}
  %d = bf16[4,3]{1,0} all-gather-done(%s)
  ROOT %cp = bf16[4,3]{1,0} collective-permute(%d), source_target_pairs={{0,1}}
}
"""
  found = compile_lib.hlo_collectives(hlo)
  assert found["all-reduce"] == {"count": 5, "bytes": 5 * 8 * 4 * 4}
  # 5 in the loop (f32[16,4]) + the async one at the top (its result's larger array, bf16[4,3])
  assert found["all-gather"] == {"count": 6, "bytes": 5 * 16 * 4 * 4 + 4 * 3 * 2}
  assert found["collective-permute"] == {"count": 1, "bytes": 4 * 3 * 2}
  assert found["reduce-scatter"]["count"] == found["all-to-all"]["count"] == 0


def test_jaxpr_flops_counts_matmuls_convolutions_and_scans():
  def f(w, x, k, img):
    def body(h, _):
      return h @ w, None
    h = jax.lax.scan(body, x, None, length=4)[0]  # 4 × 2·8·16·16
    y = jax.lax.conv_general_dilated(img, k, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return h.sum() + y.sum()

  args = (jnp.ones((16, 16)), jnp.ones((8, 16)), jnp.ones((3, 3, 2, 5)), jnp.ones((1, 6, 6, 2)))
  flops = compile_lib.jaxpr_flops(jax.make_jaxpr(f)(*args))
  conv = 2 * (1 * 4 * 4 * 5) * (3 * 3 * 2)  # output elements × (window × input channels)
  assert flops == 4 * 2 * 8 * 16 * 16 + conv
  # Under grad, a remat'd body recomputes its forward: more executed FLOPs than without.
  plain = jax.make_jaxpr(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) @ w)))(args[0], args[1])
  remat = jax.make_jaxpr(jax.grad(lambda w, x: jnp.sum(jax.checkpoint(
      lambda w, x: jnp.tanh(x @ w) @ w)(w, x))))(args[0], args[1])
  assert compile_lib.jaxpr_flops(remat.jaxpr) > compile_lib.jaxpr_flops(plain.jaxpr)


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
  assert not_fit(temporaries, "clip", config) == (
      "clip: does not fit: 358.11 GiB per chip over the 15.75 GiB of HBM; lower "
      "--config.batch_size or turn on remat in config.model")
  total = ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.10G of 15.75G hbm. "
           "Exceeded hbm capacity by 4.35G. Memory usage report: ...")
  line = not_fit(total, "clip", config)
  assert line.startswith("clip: does not fit: 4.35 GiB per chip over the 15.75 GiB of HBM; "
                         "shard the weights and optimiser state over fsdp")
  assert not_fit("INTERNAL: other", "clip", config) is None


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
# store, which `vlpre.embed` builds in ~20 min); GPT4Image is left out: its full size
# reads ImageNet and LLM-written descriptions, which this machine does not have.
_FULL_SIZE = {
    "clip": ("configs/clip.py", {}),
    "siglip": ("configs/siglip.py", {}),
    "lit": ("configs/lit.py", {}),
    "lift_online": ("configs/lift.py", {"text_mode": "online", "text_encoder.center": False}),
    "lcl": ("configs/lcl.py", {}),
    "hive": ("configs/hive.py", {}),
    "bridge": ("configs/bridge.py", {}),
}


def _full_size(name: str, batch_size: int, tmp_path, data_dir):
  path, overrides = _FULL_SIZE[name]
  config = config_lib.load(os.path.join(ROOT, path))
  config.batch_size = batch_size
  for field, value in overrides.items():
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
  if config.get("stages"):
    config.stages = config.stages[-1:]
  if config.input.get("documents"):  # LCL's interleaved documents, built from Flickr8k pairs
    config.input.documents = str(tmp_path / "train.jsonl")
    interleaved.build_flickr_interleaved(data_dir, config.input.documents)
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
