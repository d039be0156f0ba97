"""HIVE vs SA on CPU, equal steps → a markdown table.

    python -m vlpre.methods.hive.table --vit_workdir=workdirs/lift_smollm2_prompteol

Both captioners (configs/hive.py:tiny, mode=hive and mode=sa) start from the same ViT
(`--vit_workdir`, a vlpre run with an `img` tower: the tiny LIFT run; its pooling given
by `--pool`) and the packaged SmolLM2, and train through the same three stages on the
same Flickr8k batches (seed 0), `--steps` each. Reported: captioning BLEU-4 / CIDEr on
Flickr8k val (greedy), and CIFAR-10 linear and attentive probes of the ViT before HIVE
training (the first stage's at_start evaluation; the same encoder for both) and after.
Every run is the real `vlpre.stages.run` on one CPU device; finished runs are skipped on
a rerun.
"""
from __future__ import annotations

import os
import time

from absl import app
from absl import flags

from vlpre.methods import tables
from vlpre import config_lib
from vlpre import stages

ROOT = tables.CHECKOUT


def config_for(mode: str):
  c = config_lib.load(os.path.join(ROOT, "configs", "hive.py") + f":tiny,mode={mode},pool={_POOL.value}")
  c.init_from.workdir = _VIT.value
  c.batch_size = _BATCH.value
  c.stages = tuple(dict(s, steps=int(n)) for s, n in zip(c.stages, _STEPS.value))
  c.checkpoint.every_steps = 10**9
  c.evals.captioning.max_examples = _CAPTIONS.value
  return c


def run_one(mode: str) -> dict:
  config = config_for(mode)
  workdir = os.path.join(_OUT.value, mode)
  start = time.time()
  stages.run(config, workdir)
  dirs = [stages.stage_dir(workdir, i, s) for i, s in enumerate(config.stages)]
  before = tables.metrics_at(dirs[0], 0)
  after = tables.metrics_at(dirs[-1], config.stages[-1]["steps"])
  return {"before": before, "after": after, "seconds": time.time() - start}


def table(results: dict) -> str:
  lines = ["| ViT | captioning BLEU-4 | CIDEr | CIFAR-10 linear probe | attentive probe |",
           "|---|---|---|---|---|"]
  any_result = next(iter(results.values()))
  b = any_result["before"]
  lines.append(f"| before HIVE training (the LIFT ViT) | – | – | "
               f"{100 * b['linear_probe/top1']:.1f} | {100 * b['attentive_probe/top1']:.1f} |")
  for mode, r in results.items():
    a = r["after"]
    name = "after HIVE (hierarchical cross-attention)" if mode == "hive" else "after SA (cascade)"
    lines.append(f"| {name} | {a['captioning/bleu4']:.2f} | {a['captioning/cider']:.2f} | "
                 f"{100 * a['linear_probe/top1']:.1f} | {100 * a['attentive_probe/top1']:.1f} |")
  minutes = sum(r["seconds"] for r in results.values()) / 60
  lines += ["", f"Stages of {'/'.join(_STEPS.value)} steps × {_BATCH.value} Flickr8k captions; "
            f"captioning on {_CAPTIONS.value} val images; probes on 5,000 CIFAR-10 train / "
            f"2,000 test images. One CPU device, {minutes:.0f} min of runs in all."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  results = tables.start(_OUT.value)
  for mode in ("hive", "sa"):
    results.record(mode, run_one, mode)
  text = table(results.data)
  results.write(text)


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define flags of the same names.
  _VIT = flags.DEFINE_string("vit_workdir", "workdirs/lift_smollm2_prompteol",
                             "The ViT's run ('' : from scratch).")
  _POOL = flags.DEFINE_string("pool", "mean", "That run's ViT pooling.")
  _STEPS = flags.DEFINE_list("steps", ["60", "60", "60"], "Steps of the three stages.")
  _BATCH = flags.DEFINE_integer("batch_size", 16, "Captions per step.")
  _CAPTIONS = flags.DEFINE_integer("caption_examples", 200, "Flickr8k val images captioned.")
  _OUT = flags.DEFINE_string("root", "workdirs/hive_bench", "Workdirs, results.json, table.md.")
  app.run(main)
