"""GPT4Image with three describers: does describing the IMAGE add anything over the label?

    python -m vlpre.methods.lcl.table --runs=clip          # the tiny CLIP run whose ViT HIVE starts from
    python -m vlpre.methods.gpt4image.describer_table --vit_workdir=workdirs/lcl_bench/clip

1. A HIVE captioner (configs/hive.py:tiny, pool=cls) from that ViT and the packaged
   SmolLM2, through HIVE's three stages (`--hive_steps` each, `--hive_batch` captions per
   step), then captioning BLEU-4 / CIDEr on 200 Flickr8k val images.
2. Three describers over the 10,000 CIFAR-10 train images of configs/gpt4image.py:tiny:
   `class_llm`  SmolLM2-135M-Instruct writes 8 descriptions per class from the class NAME
                (the config's default, `llm-class-prompts`);
   `fixed`      one fixed text per class, "a photo of a {class}." (`precomputed`): the
                control that carries nothing but the label;
   `captioner`  the HIVE captioner writes one greedy caption from each training IMAGE
                (`vlpre-captioner`, the paper's mechanism).
   Each is embedded with the config's frozen text encoder (`vlpre.embed`).
3. `vlpre.methods.gpt4image.table` for each: CE only and CE + 0.3·L_text, seeds 0/1/2, at
   `--variant` (the CE-only arm reads no descriptions: it is run once, under class_llm).
Every stage resumes or skips what is done. The combined table goes to `<root>/table.md`.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from vlpre.methods import tables
from vlpre import config_lib
from vlpre import data
from vlpre import stages
from vlpre.methods.gpt4image import describe

ROOT = tables.CHECKOUT


HIVE_CONFIG = "configs/hive.py:tiny,pool=cls"
DESCRIBERS = ("class_llm", "fixed", "captioner")
NAMES = {"class_llm": "SmolLM2 from the class name (8 per class)",
         "fixed": "fixed text per class (\"a photo of a {class}.\")",
         "captioner": "HIVE captioner from the image (1 per image)"}


def hive_config():
  c = config_lib.load(os.path.join(ROOT, HIVE_CONFIG))
  c.init_from.workdir = _VIT.value
  c.batch_size = _HIVE_BATCH.value
  c.stages = tuple(dict(s, steps=int(n)) for s, n in zip(c.stages, _HIVE_STEPS.value))
  c.checkpoint.every_steps = 10**9
  c.evals = {"captioning": c.evals.captioning.to_dict()}  # the probes are hive_table's
  return c


def train_captioner() -> dict:
  config = hive_config()
  workdir = os.path.join(_OUT.value, "hive")
  start = time.time()
  stages.run(config, workdir)
  last = stages.stage_dir(workdir, len(config.stages) - 1, config.stages[-1])
  final = tables.metrics_at(last, config.stages[-1]["steps"])
  return {"bleu4": final["captioning/bleu4"], "cider": final["captioning/cider"],
          "seconds": time.time() - start}


def describer_overrides(name: str) -> list[str]:
  out = f"describe.output_dir={_OUT.value}/descriptions/{name}"
  if name == "class_llm":
    return [out]
  if name == "fixed":
    return [out, "describe.backend=precomputed",
            f"describe.precomputed={_OUT.value}/fixed_text.jsonl"]
  return [out, "describe.backend=vlpre-captioner", f"describe.captioner.config={HIVE_CONFIG}",
          f"describe.captioner.workdir={_OUT.value}/hive", "describe.max_new_tokens=24"]


def write_fixed_text() -> None:
  """key → "a photo of a {class}." for every training image of the GPT4Image config."""
  path = os.path.join(_OUT.value, "fixed_text.jsonl")
  if os.path.exists(path):
    return
  config = config_lib.load(os.path.join(ROOT, "configs", "gpt4image.py") + ":" + _VARIANT.value)
  keys, labels = describe.training_samples(config)
  classnames = data.load_classnames("cifar10", data_dir=config.input.get("data_dir"))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for key, label in zip(keys, labels):
      f.write(json.dumps({"key": key, "description": f"a photo of a {classnames[label]}."}) + "\n")
  os.replace(path + ".tmp", path)


def _python(*args: str) -> None:
  """One stage as its own process (its own JAX, one CPU device like this script)."""
  print("+", " ".join(args), flush=True)
  subprocess.run([sys.executable, *args], cwd=ROOT, check=True, env=os.environ.copy())


def prepare(name: str) -> None:
  """Descriptions and their embeddings for one describer (each stage a no-op once done)."""
  cfg = f"--config=configs/gpt4image.py:{_VARIANT.value}"
  sets = [f"--config.{o}" for o in describer_overrides(name)]
  _python("-m", "vlpre.methods.gpt4image.describe", cfg, *sets)
  _python("-m", "vlpre.embed", cfg, *sets)


def train_arms(name: str) -> None:
  weights = "0,0.3" if name == "class_llm" else "0.3"
  _python("-m", "vlpre.methods.gpt4image.table", f"--root={_OUT.value}/runs_{name}",
          f"--variants={_VARIANT.value}", f"--weights={weights}", f"--seeds={','.join(_SEEDS.value)}",
          "--set=" + ",".join(describer_overrides(name)))


def _pct(values: list[float]) -> str:
  if len(values) < 2:
    return f"{100 * values[0]:.1f}" if values else "–"
  return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(captioner: dict) -> str:
  runs = {}
  for name in DESCRIBERS:
    with open(os.path.join(_OUT.value, f"runs_{name}", "results.json"), encoding="utf-8") as f:
      runs[name] = [r for r in json.load(f) if r["variant"] == _VARIANT.value]
  ce = {r["seed"]: r["top1"] for r in runs["class_llm"] if r["weight"] == 0}
  seeds = sorted(ce)
  lines = ["| text target | CIFAR-10 top-1 | paired Δ vs CE only | per seed |", "|---|---|---|---|",
           f"| none (CE only) | {_pct([ce[s] for s in seeds])} | – | "
           f"{', '.join(f'{100 * ce[s]:.2f}' for s in seeds)} |"]
  for name in DESCRIBERS:
    text = {r["seed"]: r["top1"] for r in runs[name] if r["weight"] > 0}
    lines.append(f"| {NAMES[name]} | {_pct([text[s] for s in seeds])} | "
                 f"{_pct([text[s] - ce[s] for s in seeds])} | "
                 f"{', '.join(f'{100 * text[s]:.2f}' for s in seeds)} |")
  r = runs["class_llm"][0]
  lines += ["", f"configs/gpt4image.py:{_VARIANT.value}, {r['steps']} steps × {r['batch_size']}, "
            f"λ = 0.3, seeds {', '.join(map(str, seeds))}; top-1 on {r['test_examples']} CIFAR-10 "
            f"test images. The captioner: HIVE stages {'/'.join(_HIVE_STEPS.value)} × "
            f"{_HIVE_BATCH.value} Flickr8k captions from {_VIT.value}; its Flickr8k val "
            f"captioning BLEU-4 {captioner['bleu4']:.2f}, CIDEr {captioner['cider']:.2f}."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  results = tables.start(_OUT.value)
  captioner = results.record("captioner", train_captioner)
  write_fixed_text()
  for name in DESCRIBERS:
    prepare(name)
  for name in DESCRIBERS:
    train_arms(name)
  text = table(captioner)
  results.write(text)


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define flags of the same names.
  _VIT = flags.DEFINE_string("vit_workdir", "workdirs/lcl_bench/clip", "The ViT's run (CLIP tiny).")
  _HIVE_STEPS = flags.DEFINE_list("hive_steps", ["60", "60", "60"], "Steps of HIVE's three stages.")
  _HIVE_BATCH = flags.DEFINE_integer("hive_batch", 16, "Captions per HIVE step.")
  _VARIANT = flags.DEFINE_string("variant", "tiny_vit", "configs/gpt4image.py variant.")
  _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the classifier runs.")
  _OUT = flags.DEFINE_string("root", "workdirs/describer_bench", "Everything this script writes.")
  app.run(main)
