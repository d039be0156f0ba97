"""LCL (paired), LCL (interleaved + paired) and CLIP on CPU at equal steps → a markdown table.

    python -m vlpre.data.convert --mode=interleaved --pairs='flickr8k/train-*.tar' \
        --out_dir=workdirs/data/flickr8k_interleaved --split=train   # once
    python -m vlpre.methods.lcl.table --steps=200

Three real `train.run`s on one CPU device, seed 0, the same step count and the same
Flickr8k train images: `configs/lcl.py:tiny,paired` (pairs as 2-element documents),
`configs/lcl.py:tiny` (half interleaved documents, half pairs) and `configs/clip.py:tiny`.
Each ends with the same evaluators: Flickr8k val retrieval R@1/5/10 (LCL: the caption
read through the causal model with `<soi>` appended), zero-shot CIFAR-10 (the same text
path), CIFAR-10 linear and attentive probes of the ViT, and (LCL only: CLIP has no
decoder) captioning BLEU-4 / CIDEr on Flickr8k val. Finished runs are skipped on a rerun.
"""
from __future__ import annotations

import math
import os
import time

from absl import app
from absl import flags
import ml_collections as mlc

from vlpre.methods import tables
from vlpre import config_lib
from vlpre import train

ROOT = tables.CHECKOUT


CONFIGS = {"lcl_paired": "lcl.py:tiny,paired", "lcl_interleaved": "lcl.py:tiny",
           "clip": "clip.py:tiny"}
NAMES = {"lcl_paired": "LCL (paired)", "lcl_interleaved": "LCL (interleaved + paired)",
         "clip": "CLIP"}


def config_for(run: str):
  c = config_lib.load(os.path.join(ROOT, "configs", CONFIGS[run]))
  c.total_steps = _STEPS.value
  c.checkpoint.every_steps = 10**9
  c.seed = 0
  if run == "clip":  # the probes LCL's config runs; CLIP has no captioner
    lcl = config_lib.load(os.path.join(ROOT, "configs", CONFIGS["lcl_paired"]))
    evals = c.evals.to_dict()
    evals.pop("zeroshot_imagenet_sample", None)
    evals["attentive_probe_cifar10"] = lcl.evals.attentive_probe_cifar10.to_dict()
    c.evals = mlc.ConfigDict(evals)
  return c


def run_one(run: str) -> dict:
  config = config_for(run)
  workdir = os.path.join(_OUT.value, run)
  start = time.time()
  train.run(config, workdir)
  final = tables.metrics_at(workdir, config.total_steps)
  final["median_step_seconds"] = tables.seconds_per_step(workdir)
  final["seconds"] = time.time() - start
  return final


def _pct(r: dict, key: str) -> str:
  return f"{100 * r[key]:.1f}" if key in r else "–"


def table(results: dict) -> str:
  lines = ["| run | t2i R@1 / R@5 / R@10 | i2t R@1 / R@5 / R@10 | zero-shot CIFAR-10 | "
           "linear probe | attentive probe | BLEU-4 | CIDEr | s/step |",
           "|---|---|---|---|---|---|---|---|---|"]
  for run, r in results.items():
    t2i = " / ".join(_pct(r, f"retrieval_flickr8k/t2i_R@{k}") for k in (1, 5, 10))
    i2t = " / ".join(_pct(r, f"retrieval_flickr8k/i2t_R@{k}") for k in (1, 5, 10))
    bleu = f"{r['captioning_flickr8k/bleu4']:.2f}" if "captioning_flickr8k/bleu4" in r else "–"
    cider = f"{r['captioning_flickr8k/cider']:.2f}" if "captioning_flickr8k/cider" in r else "–"
    step = f"{r['median_step_seconds']:.2f}" if r.get("median_step_seconds", math.nan) > 0 else "–"
    lines.append(f"| {NAMES[run]} | {t2i} | {i2t} | {_pct(r, 'zeroshot_cifar10/top1')} | "
                 f"{_pct(r, 'linear_probe_cifar10/top1')} | "
                 f"{_pct(r, 'attentive_probe_cifar10/top1')} | {bleu} | {cider} | {step} |")
  minutes = sum(r["seconds"] for r in results.values()) / 60
  lines += ["", f"{_STEPS.value} steps each (seed 0; LCL: 16 rows of 128 tokens, up to 4 images "
            f"a row; CLIP: 64 pairs), one CPU device, {minutes:.0f} min of runs in all. "
            "Retrieval on Flickr8k val; probes on 5,000 CIFAR-10 train / 2,000 test images; "
            "captioning on 200 val images."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  results = tables.start(_OUT.value)
  for run in _RUNS.value:
    results.record(run, run_one, run)
  text = table({k: results.data[k] for k in _RUNS.value})
  results.write(text)


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define flags of the same names.
  _STEPS = flags.DEFINE_integer("steps", 200, "Training steps of every run.")
  _RUNS = flags.DEFINE_list("runs", ["lcl_paired", "lcl_interleaved", "clip"], "Runs, in order.")
  _OUT = flags.DEFINE_string("root", "workdirs/lcl_bench", "Workdirs, results.json, table.md.")
  app.run(main)
