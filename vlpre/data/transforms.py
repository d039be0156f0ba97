"""Typed grain transforms on webdataset-style dict records.

A pipeline is a plain list of these (`ds.apply([...])`): no string mini-language, so
the types are checked and each step can be unit-tested alone.

Bad records: a transform that cannot process a record (corrupt image, caption that is
not UTF-8, ...) sets `record["_bad"] = "<reason>"` and returns it instead of raising, and
every transform passes a record carrying "_bad" through untouched. `SkipBad`
(vlpre.data.records) then drops and counts them, so one broken sample in a billion
neither kills a run nor vanishes silently.

Transforms never mutate their input: they return a shallow copy, so a record cached or
re-read by grain stays as the source produced it.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

import grain
import numpy as np
from PIL import Image

from vlpre.data import tokenizers as tokenizers_lib

Record = dict[str, Any]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BAD = "_bad"


def is_bad(record: Record) -> bool:
  return BAD in record


def mark_bad(record: Record, reason: str) -> Record:
  """Returns a copy of `record` flagged bad with `reason` (key kept for the logs)."""
  record = dict(record)
  record[BAD] = reason
  return record


def _describe(record: Record) -> str:
  return repr(record.get("__key__", "<no key>"))


# ----------------------------------------------------------------------------- decoding

_MIN_MAX_PIXELS = 1 << 26  # 64 megapixels: every real photo (a 50 MP camera's is 8192x6144)


def max_image_pixels(image_size: int) -> int:
  """The decompression-bomb limit for images cropped to `image_size`: (32·image_size)²
  pixels, at least 2**26 (64 megapixels, so no real photo is refused).

  An image 32 times the crop on each side is downsampled 32x before training, so larger
  ones only cost memory: a PNG or WebP of a few KB can declare 10**10 pixels, which
  decoding would try to allocate (30 GB) in every worker. The limit is 2**26 up to
  256-pixel crops, 151 M at 384, 268 M at 512.
  """
  return max(_MIN_MAX_PIXELS, (32 * int(image_size)) ** 2)


def _raise_pil_limit(max_pixels: int) -> None:
  """PIL's own bomb check (`Image.MAX_IMAGE_PIXELS`: warns above, raises above twice) is a
  global of each process: raised, never lowered, to the largest limit a decoder here
  uses, so PIL never refuses what `DecodeImage` accepts; DecodeImage then enforces its
  own limit. Called where images are decoded, so grain's worker processes set it too."""
  if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
    Image.MAX_IMAGE_PIXELS = max_pixels


class DecodeImage(grain.transforms.Map):
  """Decodes the first present image member into `record["image"]`: uint8 [H, W, 3] RGB.

  The encoded bytes are removed so records shipped between grain processes stay small.
  Undecodable or missing images mark the record bad, and so does one declaring more than
  `max_pixels` pixels (`max_image_pixels` of the config's image size), found from its
  header before anything is decoded.
  """

  def __init__(self, keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"), out_key: str = "image",
               max_pixels: int = _MIN_MAX_PIXELS):
    self.keys = tuple(keys)
    self.out_key = out_key
    self.max_pixels = int(max_pixels)

  def map(self, record: Record) -> Record:
    if is_bad(record):
      return record
    key = next((k for k in self.keys if k in record), None)
    if key is None:
      return mark_bad(record, f"{_describe(record)}: no image member among {self.keys}")
    _raise_pil_limit(self.max_pixels)
    try:
      with Image.open(io.BytesIO(record[key])) as img:  # reads the header only
        width, height = img.size
        if width * height > self.max_pixels:
          return mark_bad(record, f"{_describe(record)}: {key!r} declares {width}x{height} pixels, "
                                  f"over the limit of {self.max_pixels} (max_image_pixels of the "
                                  "image size): a decompression bomb?")
        img.load()  # decode now, inside the try: PIL is lazy
        image_HxWx3 = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as e:  # PIL's own check, in `open`, past 2x its limit
      return mark_bad(record, f"{_describe(record)}: {key!r} declares more pixels than the limit "
                              f"of {self.max_pixels} (max_image_pixels of the image size): a "
                              f"decompression bomb? ({e})")
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many types
      return mark_bad(record, f"{_describe(record)}: cannot decode {key!r}: {type(e).__name__}: {e}")
    record = {k: v for k, v in record.items() if k not in self.keys}
    record[self.out_key] = image_HxWx3
    return record


def _decode_utf8(data: bytes | str) -> str:
  return data if isinstance(data, str) else bytes(data).decode("utf-8")


def _read_captions(record: Record, field: str) -> list[str]:
  """Raw captions: the `.json` member's `field` (str or list), else a `.txt` member.

  img2dataset's shards hold the caption in `.txt` and only metadata (url, key, status,
  sizes) in `.json`, so a `.json` without `field` falls back to the `.txt` member.
  """
  meta = None
  if "json" in record:
    meta = json.loads(_decode_utf8(record["json"]))
    if isinstance(meta, dict) and field in meta:
      value = meta[field]
      values = [value] if isinstance(value, str) else list(value)
      if not all(isinstance(v, str) for v in values):
        raise TypeError(f"json field {field!r} holds non-strings")
      return values
  if "txt" in record:
    return [_decode_utf8(record["txt"])]
  if meta is not None:
    fields = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
    raise KeyError(f"json member has no field {field!r} (it has {fields}) and there is no "
                   "txt member")
  raise KeyError("no json or txt member")


class _ParseCaptionBase:
  """Shared by ParseCaption (first/all, a Map) and RandomCaption (random, a RandomMap)."""

  def __init__(self, field: str = "captions"):
    self.field = field

  def _captions(self, record: Record) -> tuple[Record, list[str] | None]:
    try:
      captions = [c.strip() for c in _read_captions(record, self.field)]
    except UnicodeDecodeError as e:
      return mark_bad(record, f"{_describe(record)}: caption is not UTF-8 ({e})"), None
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
      return mark_bad(record, f"{_describe(record)}: bad caption member: {type(e).__name__}: {e}"), None
    captions = [c for c in captions if c]
    if not captions:
      return mark_bad(record, f"{_describe(record)}: no non-empty caption"), None
    record = {k: v for k, v in record.items() if k not in ("json", "txt")}
    return record, captions


class RandomCaption(_ParseCaptionBase, grain.transforms.RandomMap):
  """`ParseCaption(pick="random")`: one caption, uniformly at random, into `record["caption"]`.

  A RandomMap, so the choice comes from grain's per-element rng: the same seed and
  element index always pick the same caption (checkpoint-exact), epochs differ.
  """

  pick = "random"

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if is_bad(record):
      return record
    record, captions = self._captions(record)
    if captions is None:
      return record
    index = int(rng.integers(len(captions)))
    record["caption"] = captions[index]
    record["caption_index"] = index
    return record

  def __repr__(self) -> str:
    return f"ParseCaption(field={self.field!r}, pick='random')"


class ParseCaption(_ParseCaptionBase, grain.transforms.Map):
  """Parses captions: UTF-8 decode, strip, drop empty ones; none left -> bad record.

  Reads the `.json` member's `field` (a string or a list of strings), else a `.txt`
  member (one caption): img2dataset's layout, whose `.json` holds only metadata.
    pick="random": `record["caption"]` (str); returns a `RandomCaption`, a RandomMap,
      because grain routes the rng only to RandomMaps.
    pick="first":  `record["caption"]` (str), deterministic (eval, prompts).
    pick="all":    `record["captions"]` (list[str]) (retrieval eval).
  With one caption picked, `record["caption_index"]` (int) is its position in the
  `pick="all"` list, the key of caches of per-caption text embeddings.
  """

  def __new__(cls, field: str = "captions", pick: Literal["random", "first", "all"] = "random"):
    if pick == "random":
      return RandomCaption(field)
    if pick not in ("first", "all"):
      raise ValueError(f"pick must be 'random', 'first' or 'all', got {pick!r}")
    return super().__new__(cls)

  def __init__(self, field: str = "captions", pick: Literal["random", "first", "all"] = "random"):
    super().__init__(field)
    self.pick = pick

  def __getnewargs__(self) -> tuple[str, str]:
    # pickle calls __new__ with these; without them it would build a RandomCaption.
    return self.field, self.pick

  def map(self, record: Record) -> Record:
    if is_bad(record):
      return record
    record, captions = self._captions(record)
    if captions is None:
      return record
    if self.pick == "first":
      record["caption"] = captions[0]
      record["caption_index"] = 0
    else:
      record["captions"] = captions
    return record

  def __repr__(self) -> str:
    return f"ParseCaption(field={self.field!r}, pick={self.pick!r})"


class ParseLabel(grain.transforms.Map):
  """Parses a `.cls` member (ASCII integer) into `record["label"]`: int32 scalar.

  A label outside [0, num_classes) (a 1-based label set, -1 for "unknown") marks the
  record bad: one-hot targets of such a label would be all zeros, a silent wrong loss.
  num_classes=None checks only that the label is not negative.
  """

  def __init__(self, key: str = "cls", out_key: str = "label", num_classes: int | None = None):
    self.key = key
    self.out_key = out_key
    self.num_classes = num_classes

  def map(self, record: Record) -> Record:
    if is_bad(record):
      return record
    if self.key not in record:
      return mark_bad(record, f"{_describe(record)}: no {self.key!r} member")
    try:
      label = int(_decode_utf8(record[self.key]).strip())
    except (UnicodeDecodeError, ValueError) as e:
      return mark_bad(record, f"{_describe(record)}: bad label {record[self.key][:20]!r}: {e}")
    if label < 0 or (self.num_classes is not None and label >= self.num_classes):
      classes = "" if self.num_classes is None else f" of {self.num_classes} classes"
      return mark_bad(record, f"{_describe(record)}: label {label} is out of range{classes} "
                              "(labels count from 0)")
    record = {k: v for k, v in record.items() if k != self.key}
    record[self.out_key] = np.int32(label)
    return record


# ------------------------------------------------------------------------- image geometry

_RESAMPLE = Image.Resampling.BICUBIC  # CLIP's resize filter


def _resize_shorter(image_HxWx3: np.ndarray, size: int) -> Image.Image:
  h, w = image_HxWx3.shape[:2]
  scale = size / min(h, w)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  img = Image.fromarray(image_HxWx3)
  if (new_h, new_w) == (h, w):
    return img
  return img.resize((new_w, new_h), _RESAMPLE)


class _ImageMap(grain.transforms.Map):
  """Applies `_image` to record["image"]; bad records pass through."""

  key = "image"

  def map(self, record: Record) -> Record:
    if is_bad(record):
      return record
    record = dict(record)
    record[self.key] = self._image(record[self.key])
    return record

  def _image(self, image: np.ndarray) -> np.ndarray:
    raise NotImplementedError


class _RandomImageMap(grain.transforms.RandomMap):
  """Applies `_image` with grain's per-element rng; bad records pass through."""

  key = "image"

  def random_map(self, record: Record, rng: np.random.Generator) -> Record:
    if is_bad(record):
      return record
    record = dict(record)
    record[self.key] = self._image(record[self.key], rng)
    return record

  def _image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    raise NotImplementedError


def _check_sizes(resize: int, crop: int) -> None:
  if crop > resize:
    raise ValueError(f"crop size {crop} exceeds the resize size {resize}")


class ResizeCenterCrop(_ImageMap):
  """Resizes the shorter side to `resize` (bicubic) and takes the central `crop` square."""

  def __init__(self, resize: int, crop: int):
    _check_sizes(resize, crop)
    self.resize, self.crop = resize, crop

  def _image(self, image_HxWx3: np.ndarray) -> np.ndarray:
    resized_HxWx3 = np.asarray(_resize_shorter(image_HxWx3, self.resize))
    h, w = resized_HxWx3.shape[:2]
    top, left = (h - self.crop) // 2, (w - self.crop) // 2
    return resized_HxWx3[top:top + self.crop, left:left + self.crop]


class ResizeRandomCrop(_RandomImageMap):
  """Resizes the shorter side to `resize` (bicubic) and takes a random `crop` square."""

  def __init__(self, resize: int, crop: int):
    _check_sizes(resize, crop)
    self.resize, self.crop = resize, crop

  def _image(self, image_HxWx3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    resized_HxWx3 = np.asarray(_resize_shorter(image_HxWx3, self.resize))
    h, w = resized_HxWx3.shape[:2]
    top = int(rng.integers(h - self.crop + 1))
    left = int(rng.integers(w - self.crop + 1))
    return resized_HxWx3[top:top + self.crop, left:left + self.crop]


class RandomResizedCrop(_RandomImageMap):
  """Inception-style crop (torchvision's algorithm) resized to `size` x `size`.

  Samples an area fraction in `scale` and a log-uniform aspect ratio in `ratio`,
  retries 10 times, then falls back to the central crop with the ratio clamped.
  """

  def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10):
    if not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
      raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
    self.size, self.scale, self.ratio, self.attempts = size, tuple(scale), tuple(ratio), attempts

  def crop_box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the crop."""
    area = h * w
    log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
    for _ in range(self.attempts):
      target = area * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*log_ratio))
      cw = int(round(math.sqrt(target * aspect)))
      ch = int(round(math.sqrt(target / aspect)))
      if 0 < cw <= w and 0 < ch <= h:
        return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < self.ratio[0]:
      cw, ch = w, int(round(w / self.ratio[0]))
    elif in_ratio > self.ratio[1]:
      ch, cw = h, int(round(h * self.ratio[1]))
    else:
      cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw

  def _image(self, image_HxWx3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image_HxWx3.shape[:2]
    top, left, ch, cw = self.crop_box(h, w, rng)
    img = Image.fromarray(image_HxWx3)
    # One resampling pass straight from the crop box (PIL reads only that region).
    out = img.resize((self.size, self.size), _RESAMPLE, box=(left, top, left + cw, top + ch))
    return np.asarray(out)


class RandomFlip(_RandomImageMap):
  """Flips the image left-right with probability `p`."""

  def __init__(self, p: float = 0.5):
    self.p = p

  def _image(self, image_HxWx3: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < self.p:
      return np.ascontiguousarray(image_HxWx3[:, ::-1])
    return image_HxWx3


class Normalize(_ImageMap):
  """uint8 [..., H, W, 3] -> float32 `(x / 255 - mean) / std`, per channel."""

  def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    self.mean_3 = np.asarray(mean, np.float32)
    self.std_3 = np.asarray(std, np.float32)

  def _image(self, image_HxWx3: np.ndarray) -> np.ndarray:
    scaled = np.asarray(image_HxWx3, np.float32) * np.float32(1 / 255)
    return (scaled - self.mean_3) / self.std_3


class Tokenize(grain.transforms.Map):
  """Tokenizes `record[key]` into "text" int32 [L] and "text_mask" int32 [L].

  A list of strings (e.g. from `ParseCaption(pick="all")`) gives [N, L] arrays.
  """

  def __init__(self, tokenizer: tokenizers_lib.Tokenizer, max_len: int, key: str = "caption"):
    self.tokenizer, self.max_len, self.key = tokenizer, max_len, key

  def map(self, record: Record) -> Record:
    if is_bad(record):
      return record
    text = record.get(self.key)
    if text is None:
      return mark_bad(record, f"{_describe(record)}: no {self.key!r} to tokenize")
    single = isinstance(text, str)
    ids_NxL, mask_NxL = self.tokenizer.encode_batch([text] if single else list(text), self.max_len)
    record = dict(record)
    record["text"] = ids_NxL[0] if single else ids_NxL
    record["text_mask"] = mask_NxL[0] if single else mask_NxL
    return record


class KeepKeys(grain.transforms.Map):
  """Drops every field but `keys` (and "__key__", "_bad"), before records cross processes."""

  def __init__(self, keys: Sequence[str]):
    self.keys = frozenset(keys) | {"__key__", BAD}

  def map(self, record: Record) -> Record:
    if is_bad(record):
      return record
    return {k: v for k, v in record.items() if k in self.keys}
