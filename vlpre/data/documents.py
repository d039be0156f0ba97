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
An image's key is its name (`image_name`, an OBELICS entry, or a URL's last part) up to
the first ".", the webdataset key of a file of that name: the shards of the images
must be written with those names (mmc4's `image_name` is the file name it suggests).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlpre.data import sources as sources_lib

Record = dict[str, Any]
TEXT, IMAGE = "text", "image"
_expand_patterns = sources_lib._expand_patterns  # pylint: disable=protected-access  (same globs)


def image_key(ref: str) -> str:
  """The webdataset key of an image name or URL: its last part up to the first '.'."""
  name = ref.split("?", 1)[0].split("#", 1)[0].rstrip("/")
  return os.path.basename(name).split(".", 1)[0]


def read_mmc4(doc: Record) -> tuple[list[tuple], int]:
  """Elements of an MMC4 document, and the number of images matched to no sentence."""
  sentences = doc["text_list"]
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
      elements.append((TEXT, text))
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
  """Image records by key from webdataset tar shards (first sample of a key wins)."""

  def __init__(self, patterns: str | Sequence[str], data_dir: str | None = None):
    self.source = sources_lib.TarShardSource(patterns, data_dir)
    # A sorted key table, compact and quick to pickle to workers (unlike a dict).
    keys = np.asarray(self.source._index.keys, dtype=str)  # pylint: disable=protected-access
    self._order = np.argsort(keys, kind="stable")
    self._sorted_keys = keys[self._order]

  def get(self, key: str) -> Record | None:
    i = int(np.searchsorted(self._sorted_keys, key))
    if i < len(self._sorted_keys) and self._sorted_keys[i] == key:
      return self.source[int(self._order[i])]
    return None
