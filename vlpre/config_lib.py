"""Building blocks shared by the files in configs/: presets, not behaviour.

Every field is commented where it is first set; a config file composes these and
overrides what its method changes.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys

from absl import app
import ml_collections as mlc

from vlpre.nn import vit as vit_lib


def base(arg: str | None) -> mlc.ConfigDict:
  """Trainer-level defaults. `arg == "tiny"` gives the CPU-sized run of BASELINES.md."""
  tiny = arg == "tiny"
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = 500 if tiny else 100_000      # optimiser steps
  c.batch_size = 64 if tiny else 32_768          # global batch, split over data × fsdp
  c.accum_steps = 1        # gradient accumulation: batch chunks per step (vlpre/accumulate.py)
  # Contrastive losses' B×B term: "local" per device, memory falling with the devices, or
  # "global" as one array that XLA lays out (same values; docs/scaling.md).
  c.loss_impl = "local"
  c.dtype = "float32" if tiny else "bfloat16"    # compute dtype; params stay float32
  # Mesh axes (data, fsdp, tensor); -1 fills the remaining devices.
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.sharding_rules = ()    # overrides of vlpre.sharding.DEFAULT_RULES: (("embed", "fsdp"),)
  c.min_fsdp_size = 2**18  # weights this large must be sharded when fsdp > 1 (checked)
  c.frozen = ()            # regexes over 'a/b/c' param paths kept frozen (not optimised)
  c.log_every = 10 if tiny else 50
  c.checkpoint = dict(every_steps=250 if tiny else 2_000, keep=3, **{"async": True})
  c.optim = dict(name="adamw", lr=5e-4 if tiny else 1e-3, b1=0.9, b2=0.98, eps=1e-6,
                 weight_decay=0.1 if tiny else 0.2, warmup_steps=50 if tiny else 2_000,
                 schedule="cosine", grad_clip_norm=0.0)
  c.profile_steps = ()     # (first, last): jax.profiler trace of those steps (vlpre/profiling.py)
  # Weights & Biases, off by default (pip install -e ".[wandb]"; metrics.WandbSink): mode
  # "offline" writes <workdir>/wandb for a later `wandb sync`, "online" needs a network.
  c.wandb = dict(enabled=False, project="vlpre", entity="", name="", mode="offline")
  return c


def with_workdir(config, workdir: str) -> mlc.ConfigDict:
  """`config` with `workdir` set to the run's: what run-relative defaults resolve against,
  e.g. the embedding store (`text_cache: ""` → `<workdir>/embeddings/...`), so every host
  of a run sees them (a gs:// workdir). Set by the tools that take --workdir (train.run,
  vlpre.embed, vlpre.evaluate), not by hand; a config that has one keeps it (a staged
  run's stages share the run's own). A copy: the caller's config is left as it was."""
  if config.get("workdir"):
    return config
  c = copy.deepcopy(config)
  with c.unlocked():
    c.workdir = os.fspath(workdir)
  return c


def image_input(arg: str | None, train: str = "flickr8k/train-*.tar", **overrides) -> mlc.ConfigDict:
  """Paired image-text input from webdataset tar shards (or TFDS with kind="tfds")."""
  tiny = arg == "tiny"
  cfg = dict(
      kind="tar",             # tar | tfds
      data_dir=None,          # None: $VLPRE_DATA_DIR, else ../shared/data by the repo; or gs://
      train=train,            # glob(s) relative to data_dir
      index_dir="",           # persisted shard indexes: "" beside gs:// shards; a folder: there
      tfds_name="", tfds_split="train",
      caption_field="captions",
      label=False,            # emit the .cls label instead of a caption
      num_classes=0,          # label=True: labels outside [0, num_classes) are bad (0: no bound)
      image_size=64 if tiny else 224,
      resize_size=72 if tiny else 256,
      augment="resize_random_crop" if tiny else "random_resized_crop",
      flip=False,
      max_text_len=77,
      num_workers=0 if tiny else 16,  # grain worker processes (0: in-process)
      prefetch_buffer_size=2,
      shuffle=True,
      max_bad_fraction=0.01,  # fail the run past this share of unreadable samples
  )
  cfg.update(overrides)
  return mlc.ConfigDict(cfg)


def vit(arg: str | None, pool: str) -> dict:
  if arg == "tiny":  # BASELINES.md: 64 px, patch 8, width 192, depth 12, 3 heads.
    return dict(variant="Ti/8", pool=pool)
  return dict(variant="B/16", pool=pool, remat=True)


def public_towers(model: mlc.ConfigDict, kind: str) -> None:
  """Makes a two-tower `model` the architecture a transformers `kind` ("CLIP": a CLIPModel,
  also open_clip's format; "SigLIP": a SiglipModel) expresses, so `vlpre.export
  --format=hf` writes the run whole (docs/export.md): CLIP's towers have a LayerNorm
  before the image blocks, QuickGELU and LayerNorm eps 1e-5; SigLIP's text tower is
  bidirectional, pooled at its final position, with a head bias, and its image
  embedding is the attention-pooled feature itself (no image head: embed_dim = width)."""
  if kind == "CLIP":
    model.image.update(pre_norm=True, act="quick_gelu", norm_eps=1e-5)
    model.text.update(act="quick_gelu", norm_eps=1e-5)
  elif kind == "SigLIP":
    model.text.update(causal=False, pool="final")
    width = vit_lib.decode_variant(model.image.variant)["width"] if "variant" in model.image \
        else model.image.width
    model.update(image_head=False, text_head_bias=True, embed_dim=width)
  else:
    raise ValueError(f"public towers: kind must be CLIP or SigLIP, got {kind!r}")


def text_tower(arg: str | None, vocab_size: int = 49_408) -> dict:
  if arg == "tiny":
    return dict(vocab_size=vocab_size, width=192, depth=12, mlp_dim=768, num_heads=3, max_len=77)
  return dict(vocab_size=vocab_size, width=512, depth=12, mlp_dim=2048, num_heads=8, max_len=77,
              remat=True)


def standard_evals(arg: str | None, every_steps: int = 0, *, text: bool = True,
                   hard_negatives: bool = False) -> dict:
  """Flickr8k val retrieval, zero-shot CIFAR-10 and imagenet_sample, CIFAR-10 linear probe;
  `hard_negatives`: also SugarCrepe-format hard negatives built from Flickr8k val (swap and
  replace, vlpre.data.hard_negatives' rules)."""
  tiny = arg == "tiny"
  size = dict(image_size=64 if tiny else 224, resize_size=72 if tiny else 256, batch_size=200 if tiny else 1024)
  size["batch_size"] = 256 if tiny else 1024
  evals = {}
  if text:
    evals["retrieval_flickr8k"] = dict(kind="retrieval", data="flickr8k/val-*.tar",
                                       every_steps=every_steps, **size)
    evals["zeroshot_cifar10"] = dict(kind="zeroshot", data="cifar10/test-*.tar", classnames="cifar10",
                                     templates="photo", every_steps=every_steps, **size)
    evals["zeroshot_imagenet_sample"] = dict(
        kind="zeroshot", data="imagenet_sample/*.tar", classnames="imagenet_sample",
        templates="photo", every_steps=every_steps, **size)
  if text and hard_negatives:
    evals["hard_negatives_flickr8k"] = dict(
        kind="sugarcrepe", negatives_from="flickr8k/val-*.tar", images="flickr8k/val-*.tar",
        every_steps=every_steps, **size)
  evals["linear_probe_cifar10"] = dict(
      kind="linear_probe", train_data="cifar10/train-*.tar", test_data="cifar10/test-*.tar",
      num_classes=10, every_steps=every_steps, max_train_examples=5000 if tiny else 0,
      max_examples=2000 if tiny else 0, **size)
  return evals


def load(spec: str) -> mlc.ConfigDict:
  """A config from "path/to/config.py[:arg]", as `--config=` reads it (outside absl flags)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0] + "_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_arg(arg: str | None, options: dict[str, tuple[str, ...] | None],
              variants: tuple[str, ...] = ("", "tiny")) -> tuple[str, dict[str, str]]:
  """A config argument "variant,key=value,flag" → (variant, {key: value, flag: "1"}); the
  variant may be left out ("hf" = ",hf": the default variant with the flag).

  `options` maps each known key to its allowed values (None: any value, or a flag);
  an unknown variant, key or value is a one-line error naming what is allowed.
  """
  variant, *items = (arg or "").split(",")
  if variant not in variants and variant.partition("=")[0] in options:  # "hf": no variant
    variant, items = "", [variant, *items]
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r}; use one of {list(variants)}")
  opts: dict[str, str] = {}
  for item in filter(None, items):
    key, has_value, value = item.partition("=")
    if key not in options:
      raise ValueError(f"unknown option {key!r}; known: {sorted(options)}")
    value = value if has_value else "1"
    if options[key] is not None and value not in options[key]:
      raise ValueError(f"option {key} must be one of {list(options[key])}, got {value!r}")
    opts[key] = value
  return variant, opts


def parse_flags(argv):
  """absl's parser for the commands that take --config; an override of a field the config
  lacks is one line and exit status 1, not a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # raised by config_flags, e.g. --config.lossez.clip=1
    message = e
    while isinstance(message, BaseException) and message.args:  # config_dict nests the KeyError
      message = message.args[0]
    print(f"config override: no such field {str(message).replace(chr(10), '. ')}",
          file=sys.stderr)
    sys.exit(1)
