"""LCL's training input: interleaved documents tokenized and packed into fixed-length rows.

Documents (and image-caption pairs wrapped as documents) come from vlpre.data.interleaved,
their images loaded; `train_records` is the method's `InputExtras.records`, which
`build_train_dataset` runs through its own machinery (threads, SkipBad, batching,
prefetch); `config.input = input_config(...)` holds its fields.

Tokens: a text element is the tokenizer's ids without special tokens (after another
text element with a leading space, as in running text), cut into context-sized chunks if
longer than the context (nothing is dropped); an image is `<soi>`, P placeholders,
`<eoi>`; the document ends with the tokenizer's end token (CLIP's end_of_text, an LLM's
EOS). There is no start token, so a document's first token is never a target.

A document of more than L tokens or M images is split greedily at element boundaries
(never inside an image) into pieces; each piece is one packed segment with positions
from 0, so no attention crosses pieces. First-fit packing (grain) fills rows of L tokens
and M image slots; image slots fill in row order.

Row layout (shape letters: L = context_len, M = max_images, P = visual_tokens; batches
add a leading [b]):
  tokens            int32 [L]    ids, 0 on padding
  segment_ids       int32 [L]    1, 2, ... per piece, 0 = padding
  positions         int32 [L]    position in the piece
  target_mask       int32 [L]    1 where tokens[i+1] is a text token of the same piece:
                                 L_gen's targets (never `<soi>`, placeholders, `<eoi>`)
  images            float32 [M, H, W, 3]  CLIP-normalised, zeros in empty slots
  image_present     bool [M]     the slot holds an image
  image_valid       bool [M]     present and its `<soi>` is not its piece's first token
                                 (L_con skips images with no text before them)
  soi_positions     int32 [M]    row position of the image's `<soi>` (0 when empty)
  visual_positions  int32 [M, P] row positions of its placeholders (L when empty), so
                                 x_LxD.at[visual_positions].set(v_MxPxD, mode="drop")
                                 puts the visual tokens in place in one scatter
  __key__, _num_bad, _num_dropped_images: per-row lists (piece keys "<doc key>#<i>");
  batched: "_key", and the counts summed (missing or undecodable images)
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from vlpre.data import interleaved
from vlpre.data import records as records_lib
from vlpre.data import transforms as T

Record = dict[str, Any]
TEXT, IMAGE = interleaved.TEXT, interleaved.IMAGE
_META = ("__key__", "_num_bad", "_num_dropped_images")
_get = records_lib.cfg_get  # cfg: a ConfigDict, dict or dataclass


def input_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.input` for interleaved documents; the defaults build the Flickr recipe's."""
  cfg = dict(
      kind="interleaved",
      data_dir=None,              # None: $VLPRE_DATA_DIR, else ../shared/data
      documents="",               # JSONL glob(s) of documents (MMC4 or OBELICS layout)
      images="flickr8k/train-*.tar",  # tar glob(s) the documents' image keys resolve in
      paired="",                  # tar glob(s) of image-caption pairs ("" for none)
      mix=0.0,                    # fraction of paired documents (1.0: paired only)
      caption_field="captions",
      image_key=None,             # image member extension(s); None tries them all
      image_size=64, resize_size=72, augment="resize_random_crop", flip=False,
      context_len=128,            # L: tokens per row
      max_images=4,               # M: image slots per row
      visual_tokens=64,           # P: visual tokens per image, e.g. (64 / 8) ** 2
      image_token_ids=None,       # (placeholder, soi, eoi); None: vocab_size + (0, 1, 2)
      packing_bins=0,             # first-fit bins; 0: the host batch
      num_workers=0, prefetch_buffer_size=2, shuffle=True, max_bad_fraction=0.01)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


# --------------------------------------------------------------------------------- tokens


def _text_ids(tokenizer: Any, text: str) -> list[int]:
  """Ids of `text` without special tokens (the tokenizer protocol's `encode`)."""
  return list(tokenizer.encode(text))


def _end_id(tokenizer: Any) -> int | None:
  return None if tokenizer.eos_id is None else int(tokenizer.eos_id)


class TokenizeDocument(grain.transforms.Map):
  """Loaded elements -> the document's token stream and element boundaries.

  Out: "tokens" int32 [Q], "is_text" bool [Q], "element_starts" int32 [E + 1],
  "element_is_image" bool [E], plus "images", "__key__", "_num_dropped_images"; Q tokens
  and E elements (text chunks, images, the end token). Nothing left: a bad record.
  """

  def __init__(self, tokenizer: Any, *, context_len: int, visual_tokens: int,
               image_token_ids: Sequence[int]):
    placeholder, soi, eoi = image_token_ids
    self.tokenizer, self.context_len = tokenizer, context_len
    self.image_ids = [soi] + [placeholder] * visual_tokens + [eoi]

  def map(self, record: Record) -> Record:
    if T.is_bad(record):
      return record
    tokens, is_text, starts, is_image = [], [], [0], []
    previous_text = False
    for element in record["elements"]:
      if element[0] == IMAGE:
        chunks, text = [self.image_ids], False
      else:
        stripped = element[1].strip()
        ids = _text_ids(self.tokenizer, " " * previous_text + stripped) if stripped else []
        if not ids:
          continue
        step = self.context_len
        chunks, text = [ids[i:i + step] for i in range(0, len(ids), step)], True
      for chunk in chunks:
        tokens += chunk
        is_text += [text] * len(chunk)
        starts.append(len(tokens))
        is_image.append(not text)
      previous_text = text
    if not tokens:
      return T.mark_bad(record, f"{record['__key__']!r}: no text and no image left")
    end = _end_id(self.tokenizer)
    if end is not None:
      tokens.append(end)
      is_text.append(True)
      starts.append(len(tokens))
      is_image.append(False)
    return {"__key__": record["__key__"], "tokens": np.asarray(tokens, np.int32),
            "is_text": np.asarray(is_text, bool), "element_starts": np.asarray(starts, np.int32),
            "element_is_image": np.asarray(is_image, bool), "images": record["images"],
            "_num_dropped_images": record["_num_dropped_images"]}


# ------------------------------------------------------------------------------ packing


def split_points(element_starts: np.ndarray, element_is_image: np.ndarray, context_len: int,
                 max_images: int) -> list[tuple[int, int]]:
  """Greedy [start, end) token ranges of the pieces, cut only at element boundaries."""
  pieces, start, num_images = [], 0, 0
  for e, is_image in enumerate(element_is_image):
    begin, end = int(element_starts[e]), int(element_starts[e + 1])
    if begin > start and (end - start > context_len or num_images + is_image > max_images):
      pieces.append((start, begin))
      start, num_images = begin, 0
    num_images += int(is_image)
  pieces.append((start, int(element_starts[-1])))
  return pieces


class SplitDocument(grain.experimental.FlatMapTransform):
  """A tokenized document -> its pieces, each a record for the packer.

  Piece: "tokens" int32 [Q], "target_mask" int32 [Q], "images" [I, H, W, 3],
  "soi_offsets" int32 [I] (in the piece), "image_valid" bool [I], and the meta fields;
  the document's counts go with its first piece only, so sums stay right.
  """

  max_fan_out = 1 << 16  # unchecked by grain's iterator flat map; pieces are few

  def __init__(self, context_len: int, max_images: int):
    self.context_len, self.max_images = context_len, max_images

  def flat_map(self, doc: Record) -> list[Record]:
    starts, is_image = doc["element_starts"], doc["element_is_image"]
    soi_I = starts[:-1][is_image]  # every image starts with its <soi>
    pieces = []
    for i, (start, end) in enumerate(split_points(starts, is_image, self.context_len,
                                                  self.max_images)):
      in_piece = (soi_I >= start) & (soi_I < end)
      soi_offsets = (soi_I[in_piece] - start).astype(np.int32)
      target_mask = np.append(doc["is_text"][start + 1:end], False).astype(np.int32)
      pieces.append({
          "tokens": doc["tokens"][start:end], "target_mask": target_mask,
          "images": doc["images"][in_piece], "soi_offsets": soi_offsets,
          "image_valid": soi_offsets > 0, "__key__": f"{doc['__key__']}#{i}",
          "_num_bad": doc.get("_num_bad", 0) if i == 0 else 0,
          "_num_dropped_images": doc["_num_dropped_images"] if i == 0 else 0})
    return pieces


class FinishRow(grain.transforms.Map):
  """A first-fit packed row -> the row layout of the module docstring."""

  def __init__(self, visual_tokens: int):
    self.visual_tokens = visual_tokens

  def map(self, row: Record) -> Record:
    segment_ids_L, image_segment_M = row["tokens_segment_ids"], row["images_segment_ids"]
    present_M = image_segment_M > 0
    # An image's piece starts at the first token of its segment.
    piece_start_M = np.argmax(segment_ids_L[None, :] == image_segment_M[:, None], axis=1)
    soi_M = np.where(present_M, piece_start_M + row["soi_offsets"], 0).astype(np.int32)
    visual_MxP = soi_M[:, None] + 1 + np.arange(self.visual_tokens, dtype=np.int32)
    visual_MxP = np.where(present_M[:, None], visual_MxP, len(segment_ids_L)).astype(np.int32)
    return {"tokens": row["tokens"], "segment_ids": segment_ids_L,
            "positions": row["tokens_positions"], "target_mask": row["target_mask"],
            "images": row["images"], "image_present": present_M,
            "image_valid": row["image_valid"] & present_M, "soi_positions": soi_M,
            "visual_positions": visual_MxP, **{k: row[k] for k in _META}}


def pack(ds: grain.IterDataset, *, context_len: int, max_images: int, visual_tokens: int,
         num_bins: int, seed: int) -> grain.IterDataset:
  """Tokenized documents (after SkipBad) -> packed rows; checkpointable like its parent."""
  ds = grain.experimental.FlatMapIterDataset(ds, SplitDocument(context_len, max_images))
  lengths = {"tokens": context_len, "target_mask": context_len, "images": max_images,
             "soi_offsets": max_images, "image_valid": max_images}
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed, meta_features=_META)
  return ds.map(FinishRow(visual_tokens))


# -------------------------------------------------------------------------------- records


def image_token_ids(cfg: Any, tokenizer: Any) -> tuple[int, int, int]:
  """(placeholder, soi, eoi): cfg.image_token_ids, else the three ids after the vocab."""
  ids = _get(cfg, "image_token_ids")
  if ids:
    return tuple(int(i) for i in ids)
  return tokenizer.vocab_size, tokenizer.vocab_size + 1, tokenizer.vocab_size + 2


def train_records(cfg: Any, *, seed: int, tokenizer: Any, process_index: int = 0,
                  process_count: int = 1, host_batch: int = 1
                  ) -> tuple[grain.MapDataset, Callable[[grain.IterDataset], grain.IterDataset]]:
  """Tokenized documents of this host, and the stream transform that packs them.

  cfg fields: see `input_config`; the documents' own: `interleaved.document_records`.
  """
  if tokenizer is None:
    raise ValueError("interleaved documents need a tokenizer")
  context_len, max_images = int(_get(cfg, "context_len")), int(_get(cfg, "max_images"))
  visual_tokens = int(_get(cfg, "visual_tokens"))
  if visual_tokens + 2 > context_len or max_images < 1:
    raise ValueError(f"an image takes {visual_tokens + 2} tokens: context_len={context_len} "
                     f"and max_images={max_images} must hold at least one")
  ds = interleaved.document_records(cfg, seed=seed, process_index=process_index,
                                    process_count=process_count, host_batch=host_batch)
  ds = ds.map(TokenizeDocument(tokenizer, context_len=context_len, visual_tokens=visual_tokens,
                               image_token_ids=image_token_ids(cfg, tokenizer)))
  stream = functools.partial(pack, context_len=context_len, max_images=max_images,
                             visual_tokens=visual_tokens, seed=seed,
                             num_bins=int(_get(cfg, "packing_bins") or host_batch))
  return ds, stream
