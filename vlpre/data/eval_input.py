"""Evaluation input: eval splits (vlpre shards, clip_benchmark folders, TFDS) and one
ordered pass over a split in fixed-size padded batches."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
import grain
import numpy as np

from vlpre import storage
from vlpre.data import records as records_lib
from vlpre.data import sources as sources_lib
from vlpre.data import transforms as T

Record = records_lib.Record
_get = records_lib.cfg_get  # cfg: a ConfigDict, dict or dataclass

EVAL_FORMATS = ("vlpre", "clip_benchmark", "tfds")


@dataclasses.dataclass
class EvalSplit:
  """An eval split's random-access source, with the class names and prompt templates its
  format carries (None where it has none)."""
  source: Any
  classnames: list[str] | None = None
  templates: list[str] | None = None


def open_eval_split(cfg: Any, *, labels: bool = False, captions: bool = False,
                    field: str = "data") -> EvalSplit:
  """The eval split named by `cfg[field]` in the format `cfg.format`.

    format="vlpre" (default): `field` is a glob of vlpre's tar shards ("cifar10/test-*.tar").
    format="clip_benchmark": `field` is the dataset folder of clip_benchmark's webdataset
      layout (`ClipBenchmarkSource`), `cfg.split` its shard subfolder ("test"); it carries
      classnames.txt and zeroshot_classification_templates.txt.
    format="tfds": `field` is a TFDS name or a prepared dataset's folder, `cfg.split` a
      TFDS split ("test"), `cfg.tfds_data_dir` the TFDS data dir (default TFDS's own);
      feature names tfds_image_key / tfds_label_key / tfds_text_key ("image", "label",
      "captions"); the label feature's names are the class names.
  Relative paths are under the data dir (`cfg.data_dir`, `$VLPRE_DATA_DIR`).
  """
  fmt = _get(cfg, "format", "vlpre")
  where, data_dir = _get(cfg, field), _get(cfg, "data_dir")
  if not where:
    raise ValueError(f"no {field!r} given")
  if fmt == "vlpre":
    return EvalSplit(sources_lib.TarShardSource(where, data_dir=data_dir))
  if fmt == "clip_benchmark":
    source = sources_lib.ClipBenchmarkSource(where, _get(cfg, "split", "test"), data_dir)
    return EvalSplit(source, source.classnames, source.templates)
  if fmt == "tfds":
    source = sources_lib.TfdsSource(
        where, _get(cfg, "split", "test"), _get(cfg, "tfds_data_dir"),
        image_key=_get(cfg, "tfds_image_key", "image"),
        label_key=_get(cfg, "tfds_label_key", "label") if labels else None,
        text_key=_get(cfg, "tfds_text_key", "captions") if captions else None)
    return EvalSplit(source, source.classnames)
  raise ValueError(f"unknown eval format {fmt!r}; use one of {', '.join(EVAL_FORMATS)}")


# -------------------------------------------------------------------------------- eval


@dataclasses.dataclass
class EvalStats:
  num_examples: int = 0
  num_bad: int = 0
  num_batches: int = 0


class EvalBatches(Iterator[dict[str, Any]]):
  """Iterator over one ordered pass of an eval split; see `iterate_eval`.

  `stats.num_bad` (also `num_bad`) holds the bad samples skipped so far, final once the
  iterator is exhausted (then it is also logged).
  """

  def __init__(self, records: Iterator[Record], batch_size: int, with_captions: bool,
               with_labels: bool, image_shape: tuple[int, int, int], name: str):
    self._records = records
    self._batch_size = batch_size
    self._with_captions = with_captions
    self._with_labels = with_labels
    self._image_shape = image_shape
    self._name = name
    self.stats = EvalStats()
    self._done = False

  @property
  def num_bad(self) -> int:
    return self.stats.num_bad

  def __iter__(self) -> EvalBatches:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._done:
      raise StopIteration
    rows: list[Record] = []
    num_bad = 0
    for record in self._records:
      if T.is_bad(record):
        num_bad += 1
        if self.stats.num_bad + num_bad <= 10:
          logging.warning("eval %s: skipping bad sample: %s", self._name, record[T.BAD])
        continue
      rows.append(record)
      if len(rows) == self._batch_size:
        break
    self.stats.num_bad += num_bad
    if not rows:
      self._done = True
      logging.info("eval %s: %d examples in %d batches, %d bad samples skipped", self._name,
                   self.stats.num_examples, self.stats.num_batches, self.stats.num_bad)
      raise StopIteration
    n, b = len(rows), self._batch_size
    image_BxHxWx3 = np.zeros((b,) + self._image_shape, np.float32)
    image_BxHxWx3[:n] = np.stack([r["image"] for r in rows])
    mask_B = np.zeros((b,), bool)
    mask_B[:n] = True
    batch: dict[str, Any] = {"image": image_BxHxWx3, "mask": mask_B,
                             "_key": [r["__key__"] for r in rows], "_num_bad": num_bad}
    if self._with_labels:
      label_B = np.zeros((b,), np.int32)
      label_B[:n] = [r["label"] for r in rows]
      batch["label"] = label_B
    if self._with_captions:
      batch["captions"] = [list(r["captions"]) for r in rows]
    self.stats.num_examples += n
    self.stats.num_batches += 1
    return batch


def iterate_eval(source: str | Sequence[str] | Any, *, image_size: int, resize_size: int,
                 batch_size: int, data_dir: str | None = None, with_captions: bool = False,
                 with_labels: bool = False, image_key: str | Sequence[str] | None = None,
                 caption_field: str = "captions", num_threads: int = 4,
                 max_examples: int = 0, num_classes: int | None = None) -> EvalBatches:
  """One deterministic, ordered pass over an eval split, in fixed-size padded batches.

  Resize shorter side to `resize_size`, center crop `image_size`, CLIP normalize.
  Every batch has exactly `batch_size` rows; "mask" is False on the padding of the last
  one (so jitted eval steps compile once). Bad samples are skipped and counted
  (`returned.num_bad`, per batch "_num_bad", logged at the end).

  Args:
    source: one of
      * shard glob(s) relative to `data_dir` (e.g. "flickr8k/val-*.tar");
      * a config (ConfigDict/dict) with kind ("tar" | "tfds"), `pattern` (tar glob(s)) or
        tfds_name/tfds_split, and optionally data_dir, image_key, caption_field
        (these override the keyword arguments);
      * any random-access source (e.g. a `TfdsSource`).
    data_dir: see `resolve_data_dir`.
    with_captions: add "captions": list (one per real row) of lists of str.
    with_labels: add "label": int32 [batch_size] (0 on padding).
    num_classes: with labels, a label outside [0, num_classes) is a bad sample (None:
      only a negative one is).
    image_key: image member extension(s); None tries jpg, jpeg, png, webp.
    caption_field: JSON field of the captions.
    num_threads: decoding threads.
    max_examples: read only the first `max_examples` samples of the split (bad ones
      among them are skipped, not replaced); 0 reads all.

  Returns:
    An iterator (usable once) of dicts: "image" float32 [B, H, W, 3], "mask" bool [B],
    optional "label"/"captions", "_key": list[str] of the real rows, "_num_bad": int.
  """
  if isinstance(source, (str, os.PathLike)) or (
      isinstance(source, Sequence) and source and isinstance(source[0], (str, os.PathLike))):
    source = sources_lib.TarShardSource(source, data_dir=data_dir)
  elif isinstance(source, dict) or hasattr(source, "pattern") or hasattr(source, "kind"):
    cfg = _as_dict(source)
    cfg["data_dir"] = cfg.get("data_dir") or data_dir
    image_key = cfg.get("image_key") or image_key
    caption_field = cfg.get("caption_field") or caption_field
    source = records_lib.make_source(cfg, "pattern", labels=with_labels, captions=with_captions)
  ops: list[Any] = [records_lib.decode_image({"image_key": image_key, "image_size": image_size})]
  if with_labels:
    ops.append(T.ParseLabel(num_classes=num_classes))
  if with_captions:
    ops.append(T.ParseCaption(caption_field, pick="all"))
  ops += [T.ResizeCenterCrop(resize_size, image_size), T.Normalize(T.CLIP_MEAN, T.CLIP_STD)]
  ds = grain.MapDataset.source(source)
  if max_examples:
    ds = ds[:max_examples]
  ds = ds.apply(ops)
  records = iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(2 * batch_size, 16))))
  return EvalBatches(records, batch_size, with_captions, with_labels,
                     (image_size, image_size, 3), _split_name(source))


def _split_name(source: Any) -> str:
  """How the log names a split: its source's repr, or for a source without one of its own
  (a grain dataset, such as a slice of a split) its type and length."""
  if type(source).__repr__ is object.__repr__:
    return f"{type(source).__name__} of {len(source)} samples"
  return repr(source)


def _as_dict(cfg: Any) -> dict[str, Any]:
  if isinstance(cfg, dict):
    return dict(cfg)
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    return cfg.to_dict()
  return dict(vars(cfg))


def load_classnames(dataset_dir_name: str, data_dir: str | None = None) -> list[str]:
  """Class names, in label order, from `<data_dir>/<dataset_dir_name>/classnames.json`
  (local or in a bucket)."""
  path = storage.path(os.path.join(sources_lib.resolve_data_dir(data_dir), dataset_dir_name,
                                   "classnames.json"))
  names = json.loads(path.read_text(encoding="utf-8"))
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{path} must hold a JSON list of strings")
  return names
