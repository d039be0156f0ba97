"""GPT4Image on CPU: CE-only vs CE + λ·L_text, ResNet and ViT, several seeds → a markdown table.

    python -m vlpre.methods.gpt4image.describe --config=configs/gpt4image.py:tiny   # once: descriptions
    python -m vlpre.embed    --config=configs/gpt4image.py:tiny   # once: their embeddings
    python -m vlpre.methods.gpt4image.table                              # 12 runs, then the table

Every run is the real `train.run` of `configs/gpt4image.py:<variant>` on one CPU device,
with only the step count, seed and λ (`text_loss_weight`) changed, followed by top-1 on
the CIFAR-10 test split. A baseline and its GPT4Image run share the seed, so they start
from the same backbone weights and see the same batches (a paired comparison). Finished
runs are skipped on a rerun (their results are read back from `--root`).
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import statistics
import time

from absl import app
from absl import flags
from absl import logging

from vlpre.methods import tables
from vlpre import config_lib
from vlpre import train
from vlpre.methods.gpt4image import describe

ROOT = tables.CHECKOUT


def split_overrides(text: str) -> list[str]:
  """"a.b=1,c.d=x,y" → ["a.b=1", "c.d=x,y"]: only a comma before `section.key=` separates."""
  return [item for item in re.split(r",(?=[A-Za-z_]\w*(?:\.\w+)+=)", text) if item]


def load_config(arg: str):
  config = config_lib.load(os.path.join(ROOT, "configs", "gpt4image.py") + ":" + arg)
  for item in split_overrides(_SET.value):
    path, value = item.split("=", 1)
    *parents, name = path.split(".")
    node = functools.reduce(getattr, parents, config)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    setattr(node, name, value)
  return config


def run_one(variant: str, weight: float, seed: int, workdir: str) -> dict:
  config = load_config(variant)
  config.text_loss_weight = weight
  config.seed = seed
  if _STEPS.value:
    config.total_steps = _STEPS.value
  config.checkpoint.every_steps = 10**9  # only the final save
  config.evals = {"classify": dict(config.evals.classify, max_examples=_TEST.value)}
  start = time.time()
  final = train.run(config, workdir)
  return {"variant": variant, "weight": weight, "seed": seed, "steps": config.total_steps,
          "batch_size": config.batch_size, "top1": final["classify/top1"],
          "test_examples": int(final["classify/num_examples"]), "loss": final["loss"],
          "seconds": time.time() - start}


def _workdir(variant, weight, seed, steps):
  return os.path.join(_OUT.value, f"{variant}_w{weight:g}_s{seed}_n{steps}")


def _mean_std(values):
  if len(values) < 2:
    return f"{100 * values[0]:.1f}" if values else "–"
  return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(results: list[dict], describer: str, encoder: str) -> str:
  """Markdown: per variant, CE-only vs CE + λ·L_text top-1 (mean ± std over seeds)."""
  weights = sorted({r["weight"] for r in results})
  names = ["CE only" if w == 0 else f"CE + {w:g}·L_text" for w in weights]
  lines = [f"| model | {' | '.join(names)} | paired Δ (text − CE) | seeds | steps × batch "
           "| s/step |",
           "|---|" + "---|" * (len(weights) + 4)]
  for variant in dict.fromkeys(r["variant"] for r in results):
    rows = [r for r in results if r["variant"] == variant]
    by = {(r["weight"], r["seed"]): r for r in rows}
    cells = [_mean_std([r["top1"] for r in rows if r["weight"] == w]) for w in weights]
    seeds = sorted({r["seed"] for r in rows})
    deltas = [by[(w, s)]["top1"] - by[(0.0, s)]["top1"] for w in weights if w
              for s in seeds if (w, s) in by and (0.0, s) in by]
    step_time = statistics.median(r["seconds_per_step"] for r in rows)
    lines.append(f"| {variant} | {' | '.join(cells)} | {_mean_std(deltas)} | {len(seeds)} | "
                 f"{rows[0]['steps']} × {rows[0]['batch_size']} | {step_time:.2f} |")
  test = {r["test_examples"] for r in results}
  lines.append("")
  lines.append(f"CIFAR-10 test top-1 (%) on {'/'.join(map(str, sorted(test)))} test images, "
               f"trained on the 10,000-image CIFAR-10 train subset at 32 px. Describer: "
               f"{describer}; text encoder: {encoder}.")
  return "\n".join(lines)


def main(argv):
  del argv
  tables.use_one_device()
  logging.set_verbosity(logging.WARNING)
  os.makedirs(_OUT.value, exist_ok=True)
  results_path = os.path.join(_OUT.value, "results.json")
  results = []
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      results = json.load(f)
  done = {(r["variant"], r["weight"], r["seed"], r["steps"], r["test_examples"]) for r in results}
  config = load_config(_VARIANTS.value[0])
  steps_of = {v: _STEPS.value or load_config(v).total_steps for v in _VARIANTS.value}
  plan = [(v, float(w), int(s))
          for s in _SEEDS.value for v in _VARIANTS.value for w in _WEIGHTS.value]
  for i, (variant, weight, seed) in enumerate(plan):
    steps, test_n = steps_of[variant], _TEST.value or 10_000
    if (variant, weight, seed, steps, test_n) in done:
      continue
    workdir = _workdir(variant, weight, seed, steps)
    if os.path.exists(workdir):  # a run interrupted mid-way: start it over, not resume it
      shutil.rmtree(workdir)
    print(f"[{i + 1}/{len(plan)}] {variant} text_loss_weight={weight:g} seed={seed}", flush=True)
    result = run_one(variant, weight, seed, workdir)
    print(f"    top-1 {100 * result['top1']:.2f}% in {result['seconds']:.0f}s", flush=True)
    results.append(result)
    with open(results_path, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)

  meta_path = os.path.join(config.describe.output_dir, "meta.json")
  with open(meta_path, encoding="utf-8") as f:
    describer = describe.describer_name(json.load(f))
  wanted = {(v, w, s) for v, w, s in plan}
  shown = [r for r in results if (r["variant"], r["weight"], r["seed"]) in wanted
           and r["steps"] == steps_of[r["variant"]]]
  for r in shown:
    r["seconds_per_step"] = tables.seconds_per_step(_workdir(r["variant"], r["weight"], r["seed"],
                                                      r["steps"]))
  text = table(shown, describer, config.text_encoder.name)
  with open(os.path.join(_OUT.value, "table.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define flags of the same names.
  _VARIANTS = flags.DEFINE_list("variants", ["tiny_resnet", "tiny_vit"], "configs/gpt4image.py args.")
  _WEIGHTS = flags.DEFINE_list("weights", ["0", "0.3"], "text_loss_weight values (0 = CE only).")
  _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, data order, augmentation).")
  _STEPS = flags.DEFINE_integer("steps", 0, "Training steps per run (0: the config's).")
  _TEST = flags.DEFINE_integer("test_examples", 0, "Test images evaluated (0: all 10,000).")
  _OUT = flags.DEFINE_string("root", "workdirs/gpt4image_bench", "Workdirs, results.json, table.md.")
  _SET = flags.DEFINE_string("set", "", "Config overrides for every run, comma-separated "
                             "section.key=value items, e.g. describe.output_dir=workdirs/d/x "
                             "(use another --root); a comma not followed by section.key= stays "
                             "in the value (describe.captioner.config=configs/hive.py:tiny,pool=cls).")
  app.run(main)
