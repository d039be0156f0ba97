"""Step time, images/s and model FLOPs utilisation of vlpre train steps, side by side.

    python bench/step_time.py                       # the default table (tiny configs)
    python bench/step_time.py --configs=configs/clip.py:tiny --steps=10

FLOPs come from XLA's cost analysis of the compiled step; MFU divides achieved FLOP/s
by the per-device peak in PEAK_FLOPS (CPU has no fixed peak: a large fp32 matmul is
timed first and used as the CPU's peak). Rows are measured in one process, one after
another, so ratios between them compare like with like.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402,F401

from vlpre import train  # noqa: E402

# Dense bf16 peak FLOP/s per device (vendor spec sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}

_CONFIGS = flags.DEFINE_list("configs", None, "config[:arg] files; default: the LIFT vs CLIP table")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per row (after 2 warm-up steps)")
_BATCH = flags.DEFINE_integer("batch_size", 64, "global batch")
_OPENCLIP_PYTHON = flags.DEFINE_string(
    "openclip_python", os.path.join(ROOT, ".bench-venv", "bin", "python"),
    "a Python with torch + open_clip (see `make bench-venv`); missing: open_clip rows skipped")


def load_config(spec: str, overrides: dict):
  path, _, arg = spec.partition(":")
  namespace: dict = {}
  with open(path, encoding="utf-8") as f:
    exec(compile(f.read(), path, "exec"), namespace)  # pylint: disable=exec-used
  config = namespace["get_config"](arg or None)
  config.evals = {}
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def peak_flops() -> tuple[float, str]:
  kind = jax.devices()[0].device_kind
  for name, value in PEAK_FLOPS.items():
    if kind.startswith(name):
      return value * jax.device_count(), f"{kind} spec"
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    mm(a).block_until_ready()
  return 5 * 2 * n**3 / (time.perf_counter() - start), "measured fp32 matmul"


def synthetic_batch(config, batch_size: int, text_len: int, text_dim: int | None) -> dict:
  rng = np.random.default_rng(0)
  size = config.input.image_size
  batch = {"image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)}
  if text_dim is not None:
    batch["txt_emb"] = rng.normal(size=(batch_size, text_dim)).astype(np.float32)
  else:
    batch["text"] = rng.integers(1, 1000, size=(batch_size, text_len)).astype(np.int32)
    batch["text_mask"] = np.ones((batch_size, text_len), np.int32)
  return batch


def unrolled(config):
  """A copy with every `scan` flag of the model off: XLA's cost analysis counts a scanned
  loop body once, not once per layer, so FLOPs are read from the unrolled program."""
  config = copy.deepcopy(config)

  def visit(node):
    for key in list(node.keys()):
      if key == "scan":
        node[key] = False
      elif hasattr(node[key], "keys"):
        visit(node[key])

  with config.unlocked():
    visit(config.model)
    for tower in ("image", "text"):
      if tower in config.model:
        config.model[tower]["scan"] = False
  return config


def step_flops(config, batch: dict) -> float:
  s = train.setup(unrolled(config), batch)
  compiled = s.jit_train_step().lower(s.state, s.frozen, s.device_batch(batch),
                                      jax.random.key(0)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def time_row(config, batch: dict, steps: int) -> dict:
  flops = step_flops(config, batch)
  s = train.setup(config, batch)
  step_fn = s.jit_train_step()
  dbatch = s.device_batch(batch)
  rng = jax.random.key(0)
  state = s.state
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, metrics = step_fn(state, s.frozen, dbatch, rng)
    jax.block_until_ready(metrics["loss"])
    if i >= 2:
      times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"seconds": seconds, "images_per_s": len(batch["image"]) / seconds, "flops": flops}


def default_rows():
  """(label, config spec, overrides, text_len, cached) — LIFT (cached) vs CLIP at 77 and 256."""
  rows = []
  for length in (77, 256):
    clip_over = {"model.text.max_len": length, "input.max_text_len": length}
    rows.append((f"CLIP (both towers) @{length} tok", "configs/clip.py:tiny", clip_over, length, False))
    rows.append((f"LIFT cached @{length} tok", "configs/lift.py:tiny",
                 # Centring (one subtraction) would need a built store per length.
                 {"text_mode": "cached", "text_encoder.max_len": length,
                  "text_encoder.center": False}, length, True))
  return rows


def openclip_rows(batch_size: int, steps: int) -> list[tuple[str, dict]]:
  """open_clip's step on the same machine, same config, measured in this same run."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  python = _OPENCLIP_PYTHON.value
  if not os.path.exists(python):
    print(f"no open_clip Python at {python}: open_clip rows skipped (make bench-venv)")
    return []
  rows = []
  for label, mode, length in (("open_clip CLIP (both towers) @77 tok", "clip", 77),
                              ("open_clip CLIP (both towers) @256 tok", "clip", 256),
                              ("open_clip image tower vs fixed 576-d targets", "image_only", 77)):
    out = subprocess.run([python, os.path.join(ROOT, "bench", "openclip_step.py"), f"--mode={mode}",
                          f"--text_len={length}", f"--batch_size={batch_size}", f"--steps={steps}"],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append((label, {"seconds": r["seconds"], "images_per_s": batch_size / r["seconds"],
                         "flops": float("nan")}))
    print(f"measured {label}: {r['seconds']:.3f} s/step (torch {r['torch']})", flush=True)
  return rows


def main(argv):
  del argv
  peak, peak_source = peak_flops()
  rows = default_rows()
  if _CONFIGS.value:
    rows = [(spec, spec, {}, 77, False) for spec in _CONFIGS.value]
  results = []
  for label, spec, overrides, length, cached in rows:
    config = load_config(spec, {**overrides, "batch_size": _BATCH.value})
    text_dim = None
    if cached:
      from vlpre.models import lift  # pylint: disable=g-import-not-at-top
      text_dim = lift.text_encoder(config).dim
    batch = synthetic_batch(config, _BATCH.value, length, text_dim)
    r = time_row(config, batch, _STEPS.value)
    results.append((label, r))
    print(f"measured {label}: {r['seconds']:.3f} s/step", flush=True)
  if not _CONFIGS.value:
    results += openclip_rows(_BATCH.value, _STEPS.value)
  print(f"\ndevices: {jax.device_count()} x {jax.devices()[0].device_kind}; peak "
        f"{peak / 1e9:.0f} GFLOP/s ({peak_source}); batch {_BATCH.value}\n")
  print(f"| row | s/step | images/s | GFLOP/step | MFU |")
  print(f"|---|---|---|---|---|")
  for label, r in results:
    mfu = r["flops"] / r["seconds"] / peak
    flops = "—" if math.isnan(r["flops"]) else f"{r['flops'] / 1e9:.1f}"
    mfu = "—" if math.isnan(mfu) else f"{100 * mfu:.1f}%"
    print(f"| {label} | {r['seconds']:.3f} | {r['images_per_s']:.1f} | {flops} | {mfu} |")
  by_label = dict(results)
  for length in (77, 256):
    clip, lift = by_label.get(f"CLIP (both towers) @{length} tok"), by_label.get(f"LIFT cached @{length} tok")
    if clip and lift:
      print(f"\nLIFT cached / CLIP @{length} tokens: step time {lift['seconds'] / clip['seconds']:.2f}, "
            f"FLOPs {lift['flops'] / clip['flops']:.2f}")
    ours, theirs = by_label.get(f"CLIP (both towers) @{length} tok"), by_label.get(
        f"open_clip CLIP (both towers) @{length} tok")
    if ours and theirs:
      print(f"vlpre CLIP / open_clip CLIP @{length} tokens: step time "
            f"{ours['seconds'] / theirs['seconds']:.2f}")


if __name__ == "__main__":
  app.run(main)
