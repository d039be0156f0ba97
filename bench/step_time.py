"""Step time, images/s, model FLOPs utilisation and peak memory of vlpre train steps,
side by side, and the input pipeline's images/s alone.

    python bench/step_time.py                       # the default table (tiny configs)
    python bench/step_time.py --quick               # a small end-to-end check of every row kind
    python bench/step_time.py --configs=configs/clip.py:tiny --steps=10

Rows: CLIP (both towers), LIFT with cached text embeddings, LIFT online (the frozen LLM
in the step) with every caption padded to the full length and with each batch's padding
trimmed to its length bucket (real Flickr8k captions, vlpre.data.text_batching), at 77
and 256 tokens; then the grain pipeline alone (decode + augment + tokenize, and the
cached embedding join where its store exists) at 0/1/2 worker processes. Peak memory is
XLA's memory analysis of the compiled step: arguments + outputs − donated aliases +
temporaries.

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

from vlpre import train_state  # noqa: E402

# Dense bf16 peak FLOP/s per device (vendor spec sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}

_CONFIGS = flags.DEFINE_list("configs", None, "config[:arg] files; default: the LIFT vs CLIP table")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per row (after 2 warm-up steps)")
_BATCH = flags.DEFINE_integer("batch_size", 64, "global batch")
_QUICK = flags.DEFINE_boolean(
    "quick", False, "batch 8, 1 timed step, the 77-token rows and a short pipeline row: "
    "checks every row kind end to end in minutes")
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


def caption_batch(config, batch_size: int, trim: bool) -> dict:
  """Synthetic images + real Flickr8k training captions through the frozen encoder's
  tokenizer (its template included), padded to text_encoder.max_len; `trim`: cut to the
  batch's length bucket as the online trainer does (text_batching.TrimTextPadding)."""
  import glob  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  from vlpre.data import text_batching  # pylint: disable=g-import-not-at-top
  from vlpre.text_encoders import store as store_lib  # pylint: disable=g-import-not-at-top
  data_dir = config.input.get("data_dir") or os.environ.get(
      "VLPRE_DATA_DIR", os.path.join(os.path.dirname(ROOT), "shared", "data"))
  captions = []
  with tarfile.open(sorted(glob.glob(os.path.join(data_dir, "flickr8k", "train-*.tar")))[0]) as tar:
    for member in tar:
      if member.name.endswith(".json"):
        captions.append(json.load(tar.extractfile(member))["captions"][0])
        if len(captions) == batch_size:
          break
  ids, mask = store_lib.text_encoder(config).tokenizer.encode_batch(captions, config.text_encoder.max_len)
  batch = synthetic_batch(config, batch_size, 1, None)
  batch.update(text=ids, text_mask=mask)
  return text_batching.TrimTextPadding()(batch) if trim else batch


def peak_bytes(compiled) -> float:
  """XLA's memory analysis of a compiled step: arguments + outputs − aliases + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


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
    if "text_encoder" in config:  # the frozen decoder of online LIFT
      config.text_encoder["scan"] = False
  return config


def step_flops(config, batch: dict) -> float:
  s = train_state.setup(unrolled(config), batch)
  compiled = s.jit_train_step().lower(s.state, s.frozen, s.device_batch(batch),
                                      jax.random.key(0)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def time_row(config, batch: dict, steps: int) -> dict:
  flops = step_flops(config, batch)
  s = train_state.setup(config, batch)
  dbatch = s.device_batch(batch)
  rng = jax.random.key(0)
  step_fn = s.jit_train_step().lower(s.state, s.frozen, dbatch, rng).compile()
  state = s.state
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, metrics = step_fn(state, s.frozen, dbatch, rng)
    jax.block_until_ready(metrics["loss"])
    if i >= 2:
      times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"seconds": seconds, "images_per_s": len(batch["image"]) / seconds, "flops": flops,
          "peak_bytes": peak_bytes(step_fn), "text_len": batch["text"].shape[1] if "text" in batch
          else 0}


def default_rows(lengths=(77, 256)):
  """(label, config spec, overrides, text_len, kind): CLIP, LIFT cached and LIFT online
  (padded to the full length, or trimmed to each batch's bucket) at each length. kind:
  tokens (synthetic ids) | cached (synthetic embeddings) | online | online_trimmed (real
  captions through the encoder's tokenizer)."""
  rows = []
  for length in lengths:
    clip_over = {"model.text.max_len": length, "input.max_text_len": length}
    rows.append((f"CLIP (both towers) @{length} tok", "configs/clip.py:tiny", clip_over, length,
                 "tokens"))
    # Centring (one subtraction) would need a built store per length.
    lift_over = {"text_encoder.max_len": length, "input.max_text_len": length,
                 "text_encoder.center": False}
    rows.append((f"LIFT cached @{length} tok", "configs/lift.py:tiny",
                 {**lift_over, "text_mode": "cached"}, length, "cached"))
    rows.append((f"LIFT online @{length} tok, padded", "configs/lift.py:tiny",
                 {**lift_over, "text_mode": "online"}, length, "online"))
    rows.append((f"LIFT online @{length} tok, trimmed to bucket", "configs/lift.py:tiny",
                 {**lift_over, "text_mode": "online"}, length, "online_trimmed"))
  return rows


def pipeline_rows(batch_size: int, num_batches: int, workers=(0, 1, 2)) -> list[tuple[str, float]]:
  """The grain input pipeline alone: images/s of the tiny configs' training input."""
  from vlpre import config_lib  # pylint: disable=g-import-not-at-top
  from vlpre import data as data_lib  # pylint: disable=g-import-not-at-top
  from vlpre import methods  # pylint: disable=g-import-not-at-top
  out = []
  for label, spec in (("decode + augment + tokenize (CLIP)", "configs/clip.py:tiny"),
                      ("decode + augment + embedding join (LIFT cached)", "configs/lift.py:tiny")):
    config = config_lib.with_workdir(config_lib.load(spec), "workdirs/lift")  # make train's store
    try:
      extras = methods.input_extras(config)
    except (FileNotFoundError, ValueError) as e:  # no complete store (`python -m vlpre.embed`)
      print(f"pipeline row '{label}' skipped: {e}")
      continue
    tokenizer = methods.build_tokenizer(config) if extras.tokenize else None
    for num_workers in workers:
      config.input.num_workers = num_workers
      ds = data_lib.build_train_dataset(
          config.input, global_batch_size=batch_size, seed=0, tokenizer=tokenizer,
          extra_transforms=extras.transforms, extra_keys=extras.keys, stream=extras.stream,
          records=extras.records)
      it = iter(ds)
      next(it)  # worker start-up and the first batch are not timed
      start = time.perf_counter()
      for _ in range(num_batches):
        next(it)
      rate = num_batches * batch_size / (time.perf_counter() - start)
      del it
      out.append((f"{label}, num_workers={num_workers}", rate))
      print(f"measured pipeline {label}, num_workers={num_workers}: {rate:.1f} images/s",
            flush=True)
  return out


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
                         "flops": float("nan"), "peak_bytes": float("nan")}))
    print(f"measured {label}: {r['seconds']:.3f} s/step (torch {r['torch']})", flush=True)
  return rows


def main(argv):
  del argv
  quick = _QUICK.value
  batch_size = 8 if quick else _BATCH.value
  steps = 1 if quick else _STEPS.value
  peak, peak_source = peak_flops()
  rows = default_rows((77,) if quick else (77, 256))
  if _CONFIGS.value:
    rows = [(spec, spec, {}, 77, "tokens") for spec in _CONFIGS.value]
  results = []
  for label, spec, overrides, length, kind in rows:
    config = load_config(spec, {**overrides, "batch_size": batch_size})
    if kind == "cached":
      from vlpre.text_encoders import store as store_lib  # pylint: disable=g-import-not-at-top
      batch = synthetic_batch(config, batch_size, length, store_lib.text_encoder(config).dim)
    elif kind.startswith("online"):
      batch = caption_batch(config, batch_size, trim=kind == "online_trimmed")
    else:
      batch = synthetic_batch(config, batch_size, length, None)
    r = time_row(config, batch, steps)
    results.append((label, r))
    print(f"measured {label}: {r['seconds']:.3f} s/step", flush=True)
  if not _CONFIGS.value and not quick:
    results += openclip_rows(batch_size, steps)
  pipeline = [] if _CONFIGS.value else pipeline_rows(
      batch_size, 2 if quick else 10, (0, 1) if quick else (0, 1, 2))
  print(f"\ndevices: {jax.device_count()} x {jax.devices()[0].device_kind}; peak "
        f"{peak / 1e9:.0f} GFLOP/s ({peak_source}); batch {batch_size}\n")
  print(f"| row | s/step | images/s | GFLOP/step | MFU | text tokens | peak MiB |")
  print(f"|---|---|---|---|---|---|---|")
  for label, r in results:
    mfu = r["flops"] / r["seconds"] / peak
    flops = "—" if math.isnan(r["flops"]) else f"{r['flops'] / 1e9:.1f}"
    mfu = "—" if math.isnan(mfu) else f"{100 * mfu:.1f}%"
    mem = r.get("peak_bytes", float("nan"))
    mem = "—" if math.isnan(mem) else f"{mem / 2**20:.0f}"
    print(f"| {label} | {r['seconds']:.3f} | {r['images_per_s']:.1f} | {flops} | {mfu} | "
          f"{r.get('text_len') or '—'} | {mem} |")
  if pipeline:
    print(f"\n| input pipeline alone (batch {batch_size}) | images/s |\n|---|---|")
    for label, rate in pipeline:
      print(f"| {label} | {rate:.1f} |")
  by_label = dict(results)
  for length in (77, 256):
    padded = by_label.get(f"LIFT online @{length} tok, padded")
    trimmed = by_label.get(f"LIFT online @{length} tok, trimmed to bucket")
    if padded and trimmed:
      print(f"\nLIFT online trimmed ({trimmed['text_len']} tokens) / padded @{length}: step time "
            f"{trimmed['seconds'] / padded['seconds']:.2f}, FLOPs "
            f"{trimmed['flops'] / padded['flops']:.2f}")
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
