"""Interleaved image-text documents as training records: read, mixed with paired data,
their images loaded.

A document is an ordered list of elements, each a text segment or an image; the MMC4
and OBELICS layouts are read by vlpre.data.documents. Images are referenced by key and
read from webdataset tar shards (`images`), except in paired data, whose image travels
with its caption.

Paired data (tar shards of `<key>.jpg` + `<key>.json`) becomes a 2-element document of
one of the captions and the image, image first with probability 0.5; both choices are
fixed by (seed, key, epoch), so an image alternates at random between the orders.

`document_records` gives a host's documents for a method that builds its training
records from them (`build_train_dataset(records=...)`, e.g. tokenizing and packing them
into rows). A record:
  __key__              the document's key ("<file stem>:<line>", a pair's key)
  elements             [(TEXT, str) | (IMAGE, i)], i indexing "images"
  images               float32 [I, H, W, 3], decoded and augmented as the train input's
  _num_dropped_images  the document's missing or undecodable images
`build_flickr_interleaved` writes such documents from image-caption pairs
(`python -m vlpre.data.convert --mode=interleaved`).
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from typing import Any

from absl import logging
import grain
import numpy as np

from vlpre.data import documents
from vlpre.data import records as records_lib
from vlpre.data import sources as sources_lib
from vlpre.data import train_input
from vlpre.data import transforms as T

Record = dict[str, Any]
TEXT, IMAGE = documents.TEXT, documents.IMAGE
_get = records_lib.cfg_get  # cfg: a ConfigDict, dict or dataclass


# -------------------------------------------------------------------- record transforms


class ParseDocument(grain.transforms.Map):
  """A `documents.JsonlSource` record -> {"__key__", "elements", "_num_dropped_images"}."""

  def map(self, record: Record) -> Record:
    try:
      elements, unmatched = documents.read_document(json.loads(record["json"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError: ValueError
      return T.mark_bad(record, f"{record['__key__']!r}: bad document: {type(e).__name__}: {e}")
    return {"__key__": record["__key__"], "elements": elements,
            "_num_dropped_images": unmatched}


def pair_rng(seed: int, key: str, epoch: int) -> np.random.Generator:
  """The generator of a pair's choices: a function of (seed, key, epoch) alone."""
  return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8")), epoch])


class WrapPair(grain.experimental.MapWithIndexTransform):
  """An image-caption sample -> a 2-element document, image first with probability 0.5.

  `index` is the position in the host's repeated stream, so `index // epoch_len` is the
  epoch: caption and order are redrawn every epoch, identically on every rerun.
  """

  def __init__(self, seed: int, epoch_len: int, caption_field: str = "captions"):
    self.seed, self.epoch_len = seed, epoch_len
    self.parse = T.ParseCaption(caption_field, pick="all")

  def map_with_index(self, index: int, record: Record) -> Record:
    record = self.parse.map(record)
    if T.is_bad(record):
      return record
    key = record["__key__"]
    rng = pair_rng(self.seed, key, index // self.epoch_len)
    image_first = bool(rng.random() < 0.5)
    captions = record.pop("captions")
    elements = [(TEXT, captions[int(rng.integers(len(captions)))]), (IMAGE, key, record)]
    return {"__key__": key, "elements": elements[::-1] if image_first else elements,
            "_num_dropped_images": 0}


class LoadImages(grain.transforms.RandomMap):
  """Decodes and augments a document's images; drops (and counts) missing or bad ones.

  Uses the pipeline's own decoder and augmentations (one grain rng per document, drawn
  from image to image). Image elements become (IMAGE, i) with "images" [I, H, W, 3].
  """

  def __init__(self, store: documents.ImageStore | None, decode: T.DecodeImage,
               augment: Sequence[grain.transforms.Transformation], image_size: int):
    self.store, self.decode, self.augment = store, decode, list(augment)
    self.image_size = image_size

  def _image(self, raw: Record, rng: np.random.Generator) -> Record:
    record = self.decode.map(raw)
    for op in self.augment:
      if T.is_bad(record):
        break
      if isinstance(op, grain.transforms.RandomMap):
        record = op.random_map(record, rng)
      else:
        record = op.map(record)
    return record

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if T.is_bad(record):
      return record
    elements, images, dropped = [], [], record["_num_dropped_images"]
    for element in record["elements"]:
      if element[0] == TEXT:
        elements.append(element)
        continue
      _, key, raw = element
      if raw is None and self.store is not None:
        raw = self.store.get(key)
      loaded = self._image(raw, rng) if raw is not None else {T.BAD: f"no image {key!r}"}
      if T.is_bad(loaded):
        dropped += 1
        logging.log_first_n(logging.WARNING, "%s: dropping an image: %s", 10,
                            record["__key__"], loaded[T.BAD])
        continue
      elements.append((IMAGE, len(images)))
      images.append(loaded["image"])
    shape = (len(images), self.image_size, self.image_size, 3)
    images_IxHxWx3 = np.stack(images) if images else np.zeros(shape, np.float32)
    return {"__key__": record["__key__"], "elements": elements, "images": images_IxHxWx3,
            "_num_dropped_images": dropped}


# -------------------------------------------------------------------------------- records


def document_records(cfg: Any, *, seed: int, process_index: int = 0, process_count: int = 1,
                     host_batch: int = 1) -> grain.MapDataset:
  """This host's documents (module docstring), images loaded, repeated forever.

  cfg fields: data_dir; documents (JSONL glob(s), MMC4 or OBELICS layout) and images
  (the tar glob(s) their image keys resolve in); paired (image-caption tar glob(s)) and
  mix (the share of paired documents: documents and pairs are mixed 1 - mix : mix, each
  sliced per host, shuffled and repeated: `records.host_records`); caption_field;
  image_key, image_size, resize_size, augment, flip as for image-caption data
  (`train_input.image_augment`); shuffle.
  """
  mix, data_dir = float(_get(cfg, "mix") or 0.0), _get(cfg, "data_dir")
  host = dict(seed=seed, process_index=process_index, process_count=process_count,
              host_batch=host_batch)
  parts, weights = [], []
  if mix < 1:
    docs = documents.JsonlSource(_get(cfg, "documents"), data_dir)
    parts.append(records_lib.host_records(docs, cfg, **host).map(ParseDocument()))
    weights.append(1 - mix)
  if mix > 0:
    pairs = sources_lib.TarShardSource(_get(cfg, "paired"), data_dir)
    epoch_len = len(range(process_index, len(pairs), process_count))
    wrap = WrapPair(seed, epoch_len, _get(cfg, "caption_field", "captions"))
    parts.append(records_lib.host_records(pairs, cfg, **host).map_with_index(wrap))
    weights.append(mix)
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  decode = records_lib.decode_image(cfg)
  store = (documents.ImageStore(_get(cfg, "images"), data_dir, image_exts=decode.keys)
           if _get(cfg, "images") else None)
  return ds.random_map(LoadImages(store, decode,
                                  train_input.image_augment(cfg), int(_get(cfg, "image_size"))))


# -------------------------------------------------------------------------------- recipe


def build_flickr_interleaved(data_dir: str | None, out_path: str, *,
                             pattern: str = "flickr8k/train-*.tar", min_images: int = 2,
                             max_images: int = 4, seed: int = 0,
                             caption_field: str = "captions") -> dict[str, int]:
  """Writes an interleaved training set (OBELICS layout JSONL) from image-caption pairs.

  No interleaved corpus with images exists offline, so documents are built from real
  pairs: the samples in sorted key order are cut into consecutive groups of k images,
  k = min_images + crc32("<seed>:<first key>") % (max_images - min_images + 1) (the last
  group may be shorter), and each image is followed by one of its captions, number
  crc32("<seed>:<key>:caption") % captions. Images stay in the shards, referenced by
  key, so `images=pattern` resolves them. Deterministic: same inputs, same bytes.

  Returns:
    {"documents": ..., "images": ...} written.
  """
  if not 1 <= min_images <= max_images:
    raise ValueError(f"need 1 <= min_images <= max_images, got {min_images}, {max_images}")
  source = sources_lib.TarShardSource(pattern, data_dir)
  parse = T.ParseCaption(caption_field, pick="all")
  captions = {}
  for i in range(len(source)):
    record = parse.map(source[i])
    if not T.is_bad(record):
      captions[record["__key__"]] = record["captions"]
  keys = sorted(captions)
  crc = lambda text: zlib.crc32(text.encode("utf-8"))
  num_docs, start = 0, 0
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path + ".tmp", "w", encoding="utf-8") as f:
    while start < len(keys):
      k = min_images + crc(f"{seed}:{keys[start]}") % (max_images - min_images + 1)
      group, start = keys[start:start + k], start + k
      texts, images = [], []
      for key in group:
        texts += [None, captions[key][crc(f"{seed}:{key}:caption") % len(captions[key])]]
        images += [key, None]
      doc = {"id": f"flickr-{group[0]}", "texts": texts, "images": images}
      f.write(json.dumps(doc, ensure_ascii=False) + "\n")
      num_docs += 1
  os.replace(out_path + ".tmp", out_path)
  return {"documents": num_docs, "images": len(keys)}
