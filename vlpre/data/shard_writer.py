"""Writing webdataset tar shards in vlpre's layout: the shard writer, image preparation,
sample keys, and `write_samples`, which every mode of `vlpre.data.convert` ends in and a
builder of a set with its own layout calls (notebooks/get_data.py). The layout is
described in vlpre/data/convert.py.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import tarfile
from collections.abc import Callable, Iterable
from typing import Any

from absl import logging
from PIL import Image


@dataclasses.dataclass
class ConvertStats:
  """What a conversion wrote and skipped (also logged)."""
  num_written: int = 0
  num_bad: int = 0
  shards: list[str] = dataclasses.field(default_factory=list)
  bad: list[str] = dataclasses.field(default_factory=list)  # "key: reason"


# ---------------------------------------------------------------------------- writing


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
  info = tarfile.TarInfo(name)
  info.size = size
  info.mtime = 0
  info.mode = 0o644
  info.uid = info.gid = 0
  info.uname = info.gname = ""
  return info


class ShardWriter:
  """Appends samples to `<out_dir>/<split>-%05d.tar`, starting a new shard every N."""

  def __init__(self, out_dir: str, split: str, samples_per_shard: int = 1000):
    if samples_per_shard <= 0:
      raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    self._out_dir, self._split, self._per_shard = out_dir, split, samples_per_shard
    self._tar: tarfile.TarFile | None = None
    self._count = 0
    self.shards: list[str] = []

  def write(self, key: str, members: dict[str, bytes]) -> None:
    """Writes one sample; `members` maps extension (no dot) -> bytes, in writing order."""
    if "." in os.path.basename(key) or not key:
      raise ValueError(f"sample key {key!r} must be non-empty and contain no '.'")
    if self._tar is None or self._count % self._per_shard == 0:
      self._open_next()
    for ext, data in members.items():
      self._tar.addfile(_tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
    self._count += 1

  def _open_next(self) -> None:
    self.close()
    path = os.path.join(self._out_dir, f"{self._split}-{len(self.shards):05d}.tar")
    # ustar like the shared data: no pax header with mtimes; names are short keys.
    self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
    self.shards.append(path)

  def close(self) -> None:
    if self._tar is not None:
      self._tar.close()
      self._tar = None

  def __enter__(self) -> ShardWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


# ----------------------------------------------------------------------------- images


def prepare_image(data: bytes, resize: int | None, fmt: str = "auto", quality: int = 90
                  ) -> tuple[str, bytes]:
  """Validates image bytes and optionally resizes them; returns (extension, bytes).

  Original bytes are kept when no resize is asked and the file already is an RGB JPEG or
  PNG (no generation loss); anything else is re-encoded: JPEG (quality 90) unless
  `fmt` or a lossless source (PNG) says otherwise.

  Raises:
    Exception: whatever PIL raises for undecodable data (callers count it as bad).
  """
  with Image.open(io.BytesIO(data)) as img:
    img.load()
    src_format = img.format
    keep = (resize is None and img.mode == "RGB" and src_format in ("JPEG", "PNG")
            and fmt in ("auto", {"JPEG": "jpg", "PNG": "png"}[src_format]))
    if keep:
      return ("jpg" if src_format == "JPEG" else "png"), data
    rgb = img.convert("RGB")
  if resize:
    w, h = rgb.size
    scale = resize / min(w, h)
    if scale != 1:
      rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
  if fmt == "auto":
    fmt = "png" if src_format == "PNG" else "jpg"
  out = io.BytesIO()
  if fmt == "png":
    rgb.save(out, format="PNG")
  elif fmt == "jpg":
    rgb.save(out, format="JPEG", quality=quality)
  else:
    raise ValueError(f"unknown image format {fmt!r}; use auto, jpg or png")
  return fmt, out.getvalue()


def make_key(name: str) -> str:
  """Sample key from a file name: extension dropped, other '.' (and ' ') replaced by '_'.

  A key must not contain '.', since readers split key and extension at the first one.
  """
  stem = os.path.splitext(os.path.basename(name))[0]
  return stem.replace(".", "_").replace(" ", "_")


# (key, loader); the loader returns the image bytes and the other members of the sample.
Sample = tuple[str, Callable[[], tuple[bytes, dict[str, bytes]]]]


def write_samples(samples: Iterable[Sample], out_dir: str, split: str, samples_per_shard: int,
                  resize: int | None, image_format: str) -> ConvertStats:
  """Writes samples in key order, skipping (and reporting) undecodable images: what every
  mode below ends in, and what a builder of a set with its own layout calls
  (notebooks/get_data.py)."""
  if image_format not in ("auto", "jpg", "png"):
    raise ValueError(f"unknown image format {image_format!r}; use auto, jpg or png")
  stats = ConvertStats()
  samples = sorted(samples, key=lambda s: s[0])
  dupes = [k for k, n in collections.Counter(s[0] for s in samples).items() if n > 1]
  if dupes:
    raise ValueError(f"duplicate sample keys (file names differing only in extension?): {dupes[:5]}")
  with ShardWriter(out_dir, split, samples_per_shard) as writer:
    for key, load in samples:
      try:
        data, extra = load()
        ext, image = prepare_image(data, resize, image_format)
      except Exception as e:  # pylint: disable=broad-except  # PIL/IO errors of all kinds
        stats.num_bad += 1
        stats.bad.append(f"{key}: {type(e).__name__}: {e}")
        logging.warning("skipping %s: %s: %s", key, type(e).__name__, e)
        continue
      writer.write(key, {ext: image, **extra})
      stats.num_written += 1
    stats.shards = list(writer.shards)
  logging.info("wrote %d samples to %d shards in %s (%d bad images skipped)",
               stats.num_written, len(stats.shards), out_dir, stats.num_bad)
  return stats
