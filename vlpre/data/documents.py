"""Interleaved image-text documents: the MMC4 and OBELICS layouts, and their sources.

A document is an ordered list of elements:
  (TEXT, str)                 a text segment
  (IMAGE, key, record|None)   an image, by webdataset key; the record holding its bytes
                              when it travels with the document (paired data), else None:
                              look it up in the image shards (`ImageStore`)
One JSON object per line, the layout recognised by its fields:
  MMC4 (`text_list`, `image_info` [{image_name, matched_text_index, ...}]): each image
    goes right BEFORE the sentence its `matched_text_index` names, where OpenFlamingo's
    MMC4 loader (by MMC4's authors) puts its `<image>`; images matched to one sentence
    keep their `image_info` order; one matched to no sentence is dropped and counted.
    `similarity_matrix` and `matched_sim` are not read (no similarity threshold).
  OBELICS (parallel `texts` / `images` lists, one of the two null at each position).
An image's key is its full name without the last extension (`image_key`): `a/cat.jpg`
is `a/cat`, `cat.v2.jpg` is `cat.v2`, a URL `http://e.com/a/cat.jpg?s=2` is `e.com/a/cat`
(scheme, query and fragment dropped). `ImageStore` keys the image members of the shards
the same way (member `a/cat.v2.jpg` is image `a/cat.v2`), so the shards of the images
must be written with those names (mmc4's `image_name` is the file name it suggests), and
two image members with one key are refused. Texts and image references that are not
strings make the document bad (`ParseDocument` counts it).
"""
from __future__ import annotations

import os
import posixpath
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlpre.data import sources as sources_lib

Record = dict[str, Any]
TEXT, IMAGE = "text", "image"
_expand_patterns = sources_lib._expand_patterns  # pylint: disable=protected-access  (same globs)


def image_key(ref: str) -> str:
  """The full key of an image name or URL: the name without its last extension (module
  docstring); distinct names give distinct keys."""
  if not isinstance(ref, str) or not ref:
    raise TypeError(f"image reference {ref!r} is not a non-empty string")
  if "://" in ref:  # a URL: host and path, no scheme, query or fragment
    url = urllib.parse.urlsplit(ref)
    ref = url.netloc + url.path
  return posixpath.splitext(posixpath.normpath(ref).lstrip("/"))[0]


def _text(value: Any, where: str) -> str:
  if not isinstance(value, str):
    raise TypeError(f"{where} is a {type(value).__name__}, not a string")
  return value


def read_mmc4(doc: Record) -> tuple[list[tuple], int]:
  """Elements of an MMC4 document, and the number of images matched to no sentence."""
  if not isinstance(doc["text_list"], list):
    raise TypeError(f"text_list is a {type(doc['text_list']).__name__}, not a list")
  sentences = [_text(s, f"text_list[{i}]") for i, s in enumerate(doc["text_list"])]
  images_before = [[] for _ in sentences]
  unmatched = 0
  for info in doc.get("image_info") or ():
    index = info.get("matched_text_index")
    if isinstance(index, int) and 0 <= index < len(sentences):
      images_before[index].append(image_key(info["image_name"]))
    else:
      unmatched += 1
  elements: list[tuple] = []
  for sentence, keys in zip(sentences, images_before):
    elements += [(IMAGE, key, None) for key in keys]
    elements.append((TEXT, sentence))
  return elements, unmatched


def read_obelics(doc: Record) -> list[tuple]:
  """Elements of an OBELICS document, in list order."""
  texts, images = doc["texts"], doc["images"]
  if len(texts) != len(images):
    raise ValueError(f"{len(texts)} texts but {len(images)} images")
  elements: list[tuple] = []
  for i, (text, image) in enumerate(zip(texts, images)):
    if text is not None and image is not None:
      raise ValueError(f"position {i} holds both a text and an image")
    if image is not None:
      elements.append((IMAGE, image_key(image), None))
    elif text is not None:
      elements.append((TEXT, _text(text, f"texts[{i}]")))
  return elements


def read_document(doc: Record) -> tuple[list[tuple], int]:
  """Elements of an MMC4 or OBELICS document and its images dropped while reading."""
  if "text_list" in doc:
    return read_mmc4(doc)
  if "texts" in doc:
    return read_obelics(doc), 0
  raise ValueError(f"neither MMC4 (text_list) nor OBELICS (texts) layout: {sorted(doc)[:8]}")


def _line_ranges(path: str, chunk_bytes: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
  """[start, end) byte offsets of every line of `path`, read 64 MiB at a time."""
  newlines, size = [np.zeros(0, np.int64)], 0
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + size)
      size += len(chunk)
  newline = np.concatenate(newlines)
  return np.append(0, newline + 1), np.append(newline, size)


class JsonlSource:
  """grain random-access source over JSON-lines files, one record per non-empty line.

  Records are `{"__key__": "<file stem>:<line index from 0>", "json": <line bytes>}`,
  parsed by `interleaved.ParseDocument` (a bad line becomes a counted bad record). The
  index holds the lines' byte ranges, found by one scan of the files at construction;
  reads open the file, so the source pickles to grain's workers.
  """

  def __init__(self, patterns: str | Sequence[str], data_dir: str | None = None):
    self._files = _expand_patterns(patterns, data_dir)
    file_ids, starts, ends, lines = [], [], [], []
    for file_id, path in enumerate(self._files):
      start, end = _line_ranges(path)
      keep = end > start
      file_ids.append(np.full(keep.sum(), file_id, np.int32))
      starts.append(start[keep])
      ends.append(end[keep])
      lines.append(np.flatnonzero(keep))
    self._file_id = np.concatenate(file_ids)
    self._start = np.concatenate(starts).astype(np.int64)
    self._end = np.concatenate(ends).astype(np.int64)
    self._line = np.concatenate(lines).astype(np.int64)

  def __len__(self) -> int:
    return len(self._start)

  def __getitem__(self, index: int) -> Record:
    index = int(index)
    path = self._files[self._file_id[index]]
    with open(path, "rb") as f:
      f.seek(self._start[index])
      line = f.read(int(self._end[index] - self._start[index]))
    stem = os.path.basename(path).split(".", 1)[0]
    return {"__key__": f"{stem}:{self._line[index]}", "json": line}

  def __repr__(self) -> str:
    return f"JsonlSource(files={len(self._files)}, documents={len(self)})"


class ImageStore:
  """Image records by full key (`image_key`) from the image members of webdataset tar shards.

  A member `a/cat.v2.jpg` (webdataset's sample `a/cat`, extension `v2.jpg`) is image
  `a/cat.v2`; `get` returns `{"__key__": key, "jpg": bytes}`, the member under its last
  extension, or the sample's bad record.

  Raises:
    ValueError: two image members have one full key (e.g. `cat.jpg` and `cat.png`, or a
      name in two shards): a reference to it would be ambiguous.
  """

  def __init__(self, patterns: str | Sequence[str], data_dir: str | None = None,
               image_exts: Sequence[str] = sources_lib.IMAGE_EXTS):
    self.source = sources_lib.TarShardSource(patterns, data_dir)
    index = self.source._index  # pylint: disable=protected-access
    is_image = np.array([ext.rpartition(".")[2].lower() in image_exts for ext in index.exts]
                        + [False])  # (an array even with no extension at all)
    members_per_sample = np.diff(index.sample_start)
    member_sample = np.repeat(np.arange(len(members_per_sample)), members_per_sample)
    members = np.flatnonzero(is_image[index.member_ext])
    names = [index.keys[member_sample[m]] + "." + index.exts[index.member_ext[m]] for m in members]
    # A sorted key table, compact and quick to pickle to workers (unlike a dict).
    keys = np.asarray([posixpath.splitext(name)[0] for name in names], dtype=str)
    order = np.argsort(keys, kind="stable")
    self._sorted_keys, self._member = keys[order], members[order]
    self._sample = member_sample[self._member]
    same = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
    if len(same):
      def where(j: int) -> str:  # j: position in `names`
        shard = index.shards[index.sample_shard[member_sample[members[j]]]]
        return f"{names[j]!r} in {os.path.basename(shard)}"
      a, b = order[same[0]], order[same[0] + 1]
      raise ValueError(
          f"image shards {patterns!r}: {len(same)} image key(s) name two images, e.g. "
          f"{str(keys[a])!r} ({where(a)}, {where(b)}); image references resolve by full name "
          "without the extension, so each must be unique: rename or drop one")

  def __len__(self) -> int:
    return len(self._sorted_keys)

  def get(self, key: str) -> Record | None:
    i = int(np.searchsorted(self._sorted_keys, key))
    if i == len(self._sorted_keys) or self._sorted_keys[i] != key:
      return None
    record = self.source[int(self._sample[i])]
    if "_bad" in record:
      return record
    index = self.source._index  # pylint: disable=protected-access
    ext = index.exts[index.member_ext[self._member[i]]]
    return {"__key__": key, ext.rpartition(".")[2].lower(): record[ext]}
