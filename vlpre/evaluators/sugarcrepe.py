"""Compositional hard negatives in SugarCrepe's JSON format: does an image prefer its caption?

A file is a JSON dict id -> {"filename": image, "caption": positive, "negative_caption":
negative}; SugarCrepe ships one per rule (replace_obj.json, swap_att.json, ...) over COCO
val2017 images, and `python -m vlpre.data.hard_negatives` writes swap.json / replace.json
for any captioned split. The metric of a file is the fraction of its entries whose image
embedding is closer (cosine) to the positive caption than to the negative one; a tie
counts as a miss. Any model with `embed_image` and `embed_text` runs it.

    config.evals.sugarcrepe = dict(kind="sugarcrepe",
        data="workdirs/data/flickr8k_val_negatives/*.json",   # file(s) or glob(s)
        images="flickr8k/val-*.tar",  # tar shards (filenames are sample keys, or names whose
                                      # key is the stem) or a folder the filenames are in
        image_size=64, batch_size=256, max_text_len=77, max_examples=0)

Or, with no files to build first, the negatives `python -m vlpre.data.hard_negatives` would
write, made in memory from a captioned split (the same rules and seed, so the same entries):

    config.evals.hard_negatives = dict(kind="sugarcrepe",
        negatives_from="flickr8k/val-*.tar", images="flickr8k/val-*.tar",  # seed=0, per_image=1
        image_size=64, batch_size=256)

Metrics: `<name>/<file stem>` per file (`swap`, `replace` for built negatives), and
`<name>/mean` (over files) when there are several. Relative paths are under the data dir
(`data_dir`, `$VLPRE_DATA_DIR`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np

from vlpre import data
from vlpre import storage
from vlpre.data import documents
from vlpre.data import eval_input
from vlpre.data import hard_negatives
from vlpre.data import shard_writer
from vlpre.data import sources
from vlpre.evaluators import common

FIELDS = ("filename", "caption", "negative_caption")


def load_entries(path: str) -> list[dict[str, str]]:
  """The entries of one SugarCrepe JSON file, in id order as written; a clear error if malformed."""
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected a JSON dict id -> {{{', '.join(FIELDS)}}}, "
                     f"got a {type(raw).__name__}")
  for key, entry in raw.items():
    if not isinstance(entry, dict) or not all(isinstance(entry.get(f), str) for f in FIELDS):
      raise ValueError(f"{path}: entry {key!r} must hold the strings {', '.join(FIELDS)}")
  return [{f: entry[f] for f in FIELDS} for entry in raw.values()]


def preference_accuracy(zimg_NxE: np.ndarray, zpos_NxE: np.ndarray, zneg_NxE: np.ndarray) -> float:
  """Fraction of rows whose image is closer (cosine) to the positive than to the negative."""
  img_NxE = common.normalize(zimg_NxE)
  pos_N = np.sum(img_NxE * common.normalize(zpos_NxE), axis=-1)
  neg_N = np.sum(img_NxE * common.normalize(zneg_NxE), axis=-1)
  return float(np.mean(pos_N > neg_N))


class ImageFiles:
  """Random-access source of image files by name: {"__key__": name, <ext>: bytes}."""

  def __init__(self, folder: str, names: Sequence[str]):
    self.folder, self.names = folder, list(names)
    self.paths = [storage.join_inside(folder, n, what="image filename") for n in self.names]
    missing = [n for n, path in zip(self.names, self.paths) if not os.path.isfile(path)]
    if missing:
      raise FileNotFoundError(f"{len(missing)} image(s) missing from {folder}, e.g. {missing[0]!r}")

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int) -> dict[str, Any]:
    name = self.names[int(index)]
    with open(self.paths[int(index)], "rb") as f:
      payload = f.read()
    return {"__key__": name, sources._sniff_image_ext(payload): payload}  # pylint: disable=protected-access


class KeyedImages:
  """Random-access source of the samples of tar shards named by `names`: a sample key, or a
  file name whose key is its stem (as `vlpre.data.convert` and webdataset writers form it)."""

  def __init__(self, store: documents.ImageStore, names: Sequence[str]):
    self.store, self.names = store, list(names)
    missing = [n for n in self.names if self._get(n) is None]
    if missing:
      raise FileNotFoundError(f"{len(missing)} image(s) not found by key in "
                              f"{store.source!r}, e.g. {missing[0]!r}")

  def _get(self, name: str) -> dict[str, Any] | None:
    for key in dict.fromkeys((name, documents.image_key(name), shard_writer.make_key(name))):
      record = self.store.get(key)
      if record is not None:
        return record
    return None

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int) -> dict[str, Any]:
    name = self.names[int(index)]
    return {**self._get(name), "__key__": name}


class Evaluator:
  """cfg: data (JSON file(s)/glob(s)) or negatives_from (a captioned split's shard glob:
  its negatives built in memory, with seed and per_image as vlpre.data.hard_negatives takes
  them), images (tar shard glob(s) or a folder), data_dir, image_size, resize_size,
  batch_size, max_text_len, max_examples (per file, 0 = all)."""

  def __init__(self, name, cfg, predictor: common.Predictor):
    self.name, self.cfg, self.predictor = name, cfg, predictor
    data_dir = cfg.get("data_dir")
    limit = cfg.get("max_examples", 0)
    if ("data" in cfg) == ("negatives_from" in cfg):
      raise ValueError(f"evals.{name}: give either data (SugarCrepe JSON files) or "
                       "negatives_from (a captioned split to build them from)")
    if "negatives_from" in cfg:
      split = eval_input.open_eval_split(dict(data=cfg["negatives_from"], data_dir=data_dir),
                                         captions=True)
      built = hard_negatives.build(split.source, per_image=cfg.get("per_image", 1),
                                   seed=cfg.get("seed", 0))
      files = {rule: list(entries.values()) for rule, entries in built.items()}
    else:
      files = {os.path.splitext(os.path.basename(path))[0]: load_entries(path)
               for path in sources._expand_patterns(cfg["data"], data_dir)}  # pylint: disable=protected-access
    self.files = {stem: entries[:limit] if limit else entries for stem, entries in files.items()}
    names = list(dict.fromkeys(e["filename"] for es in self.files.values() for e in es))
    images = cfg["images"]
    folder = isinstance(images, str) and (
        images if os.path.isabs(images) else os.path.join(sources.resolve_data_dir(data_dir), images))
    if folder and os.path.isdir(folder):
      self.images: Any = ImageFiles(folder, names)
    else:
      self.images = KeyedImages(documents.ImageStore(images, data_dir), names)

  def run(self, variables) -> dict[str, float]:
    cfg = self.cfg
    keys: list[str] = []

    def batches():
      for batch in common.eval_batches(cfg, self.images):
        keys.extend(batch["_key"])
        yield batch

    zimg = self.predictor.image_embeddings(variables, batches())["zimg"]
    row_of = {k: i for i, k in enumerate(keys)}  # images that failed to decode are absent
    texts = list(dict.fromkeys(t for es in self.files.values() for e in es
                               for t in (e["caption"], e["negative_caption"])))
    ztxt = self.predictor.text_embeddings(variables, texts, cfg.get("max_text_len", 77),
                                          batch_size=cfg.get("batch_size", 256))
    text_row = {t: i for i, t in enumerate(texts)}
    metrics = {}
    for stem, entries in self.files.items():
      kept = [e for e in entries if e["filename"] in row_of]
      if len(kept) < len(entries):
        logging.warning("eval %s/%s: %d of %d entries dropped (their image did not decode)",
                        self.name, stem, len(entries) - len(kept), len(entries))
      if not kept:
        raise ValueError(f"eval {self.name}/{stem}: no entry has an image that decodes")
      metrics[f"{self.name}/{stem}"] = preference_accuracy(
          zimg[[row_of[e["filename"]] for e in kept]],
          ztxt[[text_row[e["caption"]] for e in kept]],
          ztxt[[text_row[e["negative_caption"]] for e in kept]])
    if len(self.files) > 1:
      metrics[f"{self.name}/mean"] = float(np.mean(list(metrics.values())))
    return metrics
