"""Bridge training on CPU: transfer after bridging, every variant at equal compute → a table.

    make fashion-mnist                 # once: the second target's shards
    python -m vlpre.methods.bridge.table       # the runs, then table.md, outliers.md/png

Variants (configs/bridge.py:tiny — SmolLM2's first 4 blocks, 8 px patches, 32 px images):
  (a) LLM blocks + full bridge          random-label bridge training of every block
  (b) LLM blocks + partial bridge       the same with the last / the first 2 blocks frozen
  (c) LLM blocks, no bridge             transfer straight from the pretrained blocks
  (d) random init + full bridge         the same architecture, no LLM weights
Stage 1 (a, b, d): `--bridge_steps` of random-label training on CIFAR-10 train (every
label moved to another class). Stage 2, per target (CIFAR-10, Fashion-MNIST): a linear
probe of the stage-1 backbone (before any fine-tuning step), then `--finetune_steps` of
full fine-tuning with true labels (fresh head, layer-wise lr decay 0.75, drop-path 0.1),
then test top-1. Every run is the real `train.run` of the config on one CPU device;
stage-2 runs share seed 0, so they see the same batches. Finished runs are skipped on a
rerun (their results are read back from `--root`).
"""
from __future__ import annotations

import os
import time

from absl import app
from absl import flags

from vlpre.methods import tables
from vlpre import config_lib
from vlpre import metrics
from vlpre import train
from vlpre.methods.bridge import analyze_outliers

ROOT = tables.CHECKOUT

# name → (configs/bridge.py options, bridged?)
VARIANTS = {
    "a_full_bridge": ("", True),
    "b_partial_last2_frozen": ("freeze=last2", True),
    "b_partial_first2_frozen": ("freeze=first2", True),
    "c_no_bridge": ("", False),
    "d_random_init_bridge": ("init=random", True),
}
LABELS = {
    "a_full_bridge": "(a) LLM blocks + full bridge",
    "b_partial_last2_frozen": "(b) partial bridge, last 2 blocks frozen",
    "b_partial_first2_frozen": "(b) partial bridge, first 2 blocks frozen",
    "c_no_bridge": "(c) LLM blocks, no bridge",
    "d_random_init_bridge": "(d) random init + full bridge",
}


def load_config(arg: str):
  return config_lib.load(os.path.join(ROOT, "configs", "bridge.py") + ":" + arg)


def _arg(*parts: str) -> str:
  return ",".join(p for p in ("tiny", *parts) if p)


def bridge(variant: str) -> dict:
  config = load_config(_arg(VARIANTS[variant][0]))
  config.total_steps = _BRIDGE_STEPS.value
  config.checkpoint.every_steps = 10**9  # only the final save
  config.evals = {}  # stage 2 probes the bridged backbone
  start = time.time()
  final = train.run(config, os.path.join(_OUT.value, variant))
  return {"loss": final["loss"], "seconds": time.time() - start}


def finetune(variant: str, target: str) -> dict:
  options, bridged = VARIANTS[variant]
  config = load_config(_arg("finetune", f"target={target}", options))
  config.total_steps = _FT_STEPS.value
  config.checkpoint.every_steps = 10**9
  if bridged:
    config.init_from.workdir = os.path.join(_OUT.value, variant)
  workdir = os.path.join(_OUT.value, f"{variant}_ft_{target}")
  start = time.time()
  final = train.run(config, workdir)
  probe = [r for r in metrics.read_metrics(workdir) if "linear_probe/top1" in r]
  return {"probe": probe[0]["linear_probe/top1"], "finetune": final["classify/top1"],
          "loss": final["loss"], "seconds": time.time() - start}


def table(results: dict) -> str:
  targets = [t for t in _TARGETS.value]
  head = " | ".join(f"{t} linear probe | {t} fine-tune" for t in targets)
  lines = [f"| variant | {head} |", "|---|" + "---|" * (2 * len(targets))]
  for variant in _VARIANTS.value:
    cells = []
    for t in targets:
      r = results.get(f"{variant}/{t}")
      cells += ([f"{100 * r['probe']:.1f}", f"{100 * r['finetune']:.1f}"] if r else ["–", "–"])
    lines.append(f"| {LABELS[variant]} | " + " | ".join(cells) + " |")
  total = sum(r["seconds"] for r in results.values())
  lines += ["", f"Top-1 (%) on the first 2,000 test images; linear probe: ridge on 5,000 "
            f"training images' features before fine-tuning. Stage 1: {_BRIDGE_STEPS.value} "
            f"steps × 64 random-label CIFAR-10 images ((c): none); stage 2: {_FT_STEPS.value} "
            f"steps × 64. One CPU device, {total / 60:.0f} min of runs in all."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  results = tables.start(_OUT.value)

  for variant in _VARIANTS.value:
    if VARIANTS[variant][1]:
      results.record(f"{variant}/bridge", bridge, variant)
    for target in _TARGETS.value:
      results.record(f"{variant}/{target}", finetune, variant, target)
  text = table({k: v for k, v in results.data.items() if not k.endswith("/bridge")})
  results.write(text)
  if "a_full_bridge" in _VARIANTS.value:
    vit = _VIT.value if _VIT.value and os.path.isdir(_VIT.value) else ""
    analyze_outliers.analyze(_OUT.value, num_layers=4, vit_workdir=vit,
                             bridge_workdir=os.path.join(_OUT.value, "a_full_bridge"))
    print(open(os.path.join(_OUT.value, "outliers.md")).read())
  print("seconds per run:", {k: round(v["seconds"]) for k, v in results.data.items()})


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define flags of the same names.
  _VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Which variants.")
  _TARGETS = flags.DEFINE_list("targets", ["cifar10", "fashion_mnist"], "Transfer targets.")
  _BRIDGE_STEPS = flags.DEFINE_integer("bridge_steps", 300, "Stage-1 steps (random labels).")
  _FT_STEPS = flags.DEFINE_integer("finetune_steps", 200, "Stage-2 fine-tuning steps.")
  _OUT = flags.DEFINE_string("root", "workdirs/bridge_bench", "Workdirs, results.json, table.md.")
  _VIT = flags.DEFINE_string("outlier_vit_workdir", "workdirs/lift_smollm2_prompteol",
                             "A vision-trained vlpre run for the outlier comparison ('' for none).")
  app.run(main)
