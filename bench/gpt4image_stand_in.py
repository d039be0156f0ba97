"""GPT4Image's full-size inputs stood in for by CIFAR-10, for `vlpre.compile`.

A full-size GPT4Image config trains on ImageNet with LLM-written descriptions embedded in
a store; this machine has neither. `vlpre.compile` reads one example through the config's
own input pipeline, so what a compile needs is a training shard and a store with the real
shapes: the full config decodes any image to its 224-pixel crop, and its text encoder
(MiniLM, 384 dims) embeds whatever describes the image. This writes both from the first
CIFAR-10 training images: a shard of them, one description per image ("a photo of a
<class>.", no LLM), the `precomputed` describer over them and the store, and prints the
overrides that point a config at them:

    python bench/gpt4image_stand_in.py --out=workdirs/gpt4image_stand_in
    python -m vlpre.compile --config=configs/gpt4image.py:resnet50 --topology=v5e:8x8 \
        $(cat workdirs/gpt4image_stand_in/overrides)

Labels stay CIFAR's (0–9 of the config's 1,000 classes); none of this changes a step's
shapes, so the compiled step is the full config's.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from vlpre import config_lib  # noqa: E402
from vlpre.data import eval_input  # noqa: E402
from vlpre.data import shard_writer  # noqa: E402
from vlpre.data import sources  # noqa: E402
from vlpre.methods.gpt4image import describe as describe_lib  # noqa: E402
from vlpre.text_encoders import store as store_lib  # noqa: E402


def write(out_dir: str, config_spec: str = "configs/gpt4image.py:resnet50",
          num_images: int = 32, data_dir: str | None = None) -> dict[str, str]:
  """Writes the stand-in under `out_dir`; returns the config overrides that use it (absolute
  paths: a relative shard pattern would be read under the data dir)."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  source = sources.TarShardSource("cifar10/train-00000.tar", data_dir=data_dir)
  classes = eval_input.load_classnames("cifar10", data_dir)
  descriptions = os.path.join(out_dir, "descriptions.jsonl")
  with shard_writer.ShardWriter(out_dir, "train") as writer, \
      open(descriptions, "w", encoding="utf-8") as f:
    for index in range(num_images):
      sample = source[index]
      key = sample["__key__"]
      writer.write(key, {k: v for k, v in sample.items() if not k.startswith("__")})
      label = int(bytes(sample["cls"]).decode())
      f.write(json.dumps({"key": key, "description": f"a photo of a {classes[label]}."}) + "\n")
  overrides = {"input.train": os.path.join(out_dir, "train-*.tar"),
               "describe.backend": "precomputed", "describe.precomputed": descriptions,
               "describe.output_dir": os.path.join(out_dir, "descriptions"),
               "text_cache": os.path.join(out_dir, "store")}
  config = config_lib.load(os.path.join(ROOT, config_spec))
  for field, value in overrides.items():
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
  if data_dir:
    config.input.data_dir = data_dir
  describe_lib.describe(config, progress=False)
  store_lib.build_store(config, progress=False)
  with open(os.path.join(out_dir, "overrides"), "w", encoding="utf-8") as f:
    f.write(" ".join(f"--config.{k}={v}" for k, v in overrides.items()) + "\n")
  return overrides


def main(argv):
  del argv
  overrides = write(flags.FLAGS.out, flags.FLAGS.config, flags.FLAGS.num_images)
  print(" ".join(f"--config.{k}={v}" for k, v in overrides.items()))


if __name__ == "__main__":
  flags.DEFINE_string("out", "workdirs/gpt4image_stand_in", "Where the stand-in goes.")
  flags.DEFINE_string("config", "configs/gpt4image.py:resnet50", "The config it stands in for "
                      "(its describer and text encoder settings key the store).")
  flags.DEFINE_integer("num_images", 32, "CIFAR-10 training images in the stand-in shard.")
  app.run(main)
