"""Training records of the text embedder: pairs of captions of one image, images unread.

Every image of the split is a record; each epoch it yields two distinct captions of its
own (anchor, positive), drawn anew every epoch and identically on every rerun, and, with
`hard_negatives`, one caption of its lexical neighbour: the other image whose captions
share the most words with its own (TF-IDF over hashed words, cosine). Captions of two
images that both show "a dog running on grass" are what an embedder must learn to tell
apart; in-batch negatives are mostly easy ones.

Only the captions are read: the tar shards are scanned once for their JSON members
(vlpre.methods.lift.text_score.split_captions), never decoded as images.

Row layout (P = 2 texts, or 3 with a hard negative; L = max_text_len):
  text       int32 [P, L]  token ids (anchor, positive[, negative]), templated
  text_mask  int32 [P, L]  1 on real tokens
"""
from __future__ import annotations

import re
import zlib
from typing import Any

import grain
import ml_collections
import numpy as np

from vlpre.data import records as records_lib
from vlpre.methods.lift import text_score

_get = records_lib.cfg_get
_WORD = re.compile(r"[a-z]+")


def input_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.input` of the text embedder: caption pairs of an image-caption split."""
  cfg = dict(
      kind="caption_pairs",        # read by this method's records (no images)
      data_dir=None,               # None: $VLPRE_DATA_DIR, else ../shared/data
      train="flickr8k/train-*.tar",  # image-caption shards whose captions pair up
      caption_field="captions",
      max_text_len=48,             # tokens per text, template included (PromptEOL: ~15 of them)
      hard_negatives=False,        # add a caption of the lexical-neighbour image per pair
      hash_buckets=4096,           # hashed vocabulary of the neighbour search
      num_workers=0, prefetch_buffer_size=2, shuffle=True, max_bad_fraction=0.01)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def caption_sets(cfg) -> list[list[str]]:
  """Each image's captions (images with fewer than two are left out: no pair)."""
  texts, owner = text_score.split_captions(_get(cfg, "train"), _get(cfg, "data_dir"),
                                           caption_field=_get(cfg, "caption_field", "captions"))
  sets: dict[int, list[str]] = {}
  for text, image in zip(texts, owner.tolist()):
    sets.setdefault(image, []).append(text)
  return [caps for _, caps in sorted(sets.items()) if len(caps) >= 2]


def lexical_neighbours(sets: list[list[str]], buckets: int = 4096) -> np.ndarray:
  """int [N]: for each image, the other image whose captions are closest by TF-IDF cosine
  (words hashed into `buckets` with crc32, so the result is the same on every host)."""
  counts_NxV = np.zeros((len(sets), buckets), np.float32)
  for i, captions in enumerate(sets):
    for word in _WORD.findall(" ".join(captions).lower()):
      counts_NxV[i, zlib.crc32(word.encode()) % buckets] += 1
  idf_V = np.log((1 + len(sets)) / (1 + (counts_NxV > 0).sum(axis=0))) + 1
  tfidf_NxV = counts_NxV * idf_V
  tfidf_NxV /= np.maximum(np.linalg.norm(tfidf_NxV, axis=1, keepdims=True), 1e-9)
  out = np.zeros(len(sets), np.int64)
  for lo in range(0, len(sets), 1024):  # blocks keep the N x N scores out of memory
    scores = tfidf_NxV[lo:lo + 1024] @ tfidf_NxV.T
    scores[np.arange(len(scores)), np.arange(lo, lo + len(scores))] = -np.inf
    out[lo:lo + len(scores)] = np.argmax(scores, axis=1)
  return out


class MakePair(grain.experimental.MapWithIndexTransform):
  """An image's index → its tokenized (anchor, positive[, hard negative]) texts.

  `index` is the position in the host's repeated stream, so `index // epoch_len` is the
  epoch: the captions are redrawn every epoch, identically on every rerun.
  """

  def __init__(self, sets, neighbours, tokenizer, *, seed: int, epoch_len: int, max_len: int):
    self.sets, self.neighbours, self.tokenizer = sets, neighbours, tokenizer
    self.seed, self.epoch_len, self.max_len = seed, epoch_len, max_len

  def map_with_index(self, index: int, image: int) -> dict[str, Any]:
    rng = np.random.default_rng([self.seed, int(image), index // self.epoch_len])
    captions = self.sets[image]
    first, second = rng.choice(len(captions), size=2, replace=False)
    texts = [captions[first], captions[second]]
    if self.neighbours is not None:
      other = self.sets[self.neighbours[image]]
      texts.append(other[int(rng.integers(len(other)))])
    ids_PxL, mask_PxL = self.tokenizer.encode_batch(texts, self.max_len)
    return {"__key__": str(image), "text": ids_PxL.astype(np.int32),
            "text_mask": mask_PxL.astype(np.int32)}


def train_records(cfg, *, seed: int, tokenizer: Any, process_index: int = 0,
                  process_count: int = 1, host_batch: int = 1):
  """This host's caption-pair records (the method's `InputExtras.records`), no stream step."""
  if tokenizer is None:
    raise ValueError("caption pairs need the LLM's tokenizer")
  sets = caption_sets(cfg)
  if not sets:
    raise ValueError(f"input.train {_get(cfg, 'train')!r}: no image with two captions")
  neighbours = (lexical_neighbours(sets, int(_get(cfg, "hash_buckets", 4096)))
                if _get(cfg, "hard_negatives", False) else None)
  images = np.arange(len(sets))
  ds = records_lib.host_records(images, cfg, seed=seed, process_index=process_index,
                                process_count=process_count, host_batch=host_batch)
  epoch_len = len(range(process_index, len(sets), process_count))
  return ds.map_with_index(MakePair(sets, neighbours, tokenizer, seed=seed, epoch_len=epoch_len,
                                    max_len=int(_get(cfg, "max_text_len", 48)))), None
