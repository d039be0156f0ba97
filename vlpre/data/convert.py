r"""Writes webdataset tar shards in the layout of /work/shared/data.

Layout (what TarShardSource and the README of the shared data expect): each sample's
members are adjacent, image first (`<key>.jpg|png`, then `<key>.json` or `<key>.cls`);
samples sorted by key; `--samples_per_shard` per shard, named `<out>/<split>-%05d.tar`;
ustar headers with mtime 0, uid/gid 0 and mode 0644, so rebuilding gives byte-identical
shards. Images that PIL cannot decode are skipped and reported.

Usage:
  # (a) image folder + captions (CSV with columns filename,caption, several rows per
  #     image allowed; or JSONL with {"filename": ..., "caption" | "captions": ...})
  python -m vlpre.data.convert --mode=captions --images_dir=imgs/ \
      --captions=captions.csv --out_dir=out/mydata --split=train --resize=160
  # (b) one subfolder per class -> .cls members + classnames.json (sorted folder names)
  python -m vlpre.data.convert --mode=classes --images_dir=train/ --out_dir=out/x --split=train
  # (c) a locally prepared TFDS dataset (array_record)
  python -m vlpre.data.convert --mode=tfds --tfds_name=cifar10 --tfds_split=test \
      --tfds_data_dir=~/tensorflow_datasets --out_dir=out/cifar10 --split=test
  # (d) MNIST-format IDX files (e.g. Fashion-MNIST from Debian's dataset-fashion-mnist,
  #     /usr/share/datasets/fashion-mnist) -> PNG + .cls shards, both splits
  python -m vlpre.data.convert --mode=idx --idx_dir=/usr/share/datasets/fashion-mnist \
      --idx_classnames=fashion_mnist --out_dir=workdirs/data/fashion_mnist
  # (e) interleaved documents (OBELICS-layout JSONL, <out_dir>/<split>.jsonl) built from
  #     image-caption shards, 2-4 consecutive images per document, each followed by one
  #     of its captions (vlpre.data.interleaved.build_flickr_interleaved); the images
  #     stay in the shards: train with input.documents=<that file>, input.images=--pairs
  #     (--skip_existing: leave an existing <out_dir>/<split>.jsonl as it is)
  python -m vlpre.data.convert --mode=interleaved --pairs='flickr8k/train-*.tar' \
      --out_dir=workdirs/data/flickr8k_interleaved --split=train
  # (f) a CSV or parquet table of (image path, caption) rows; paths relative to the
  #     table's folder (or --images_dir), columns --image_column / --caption_column
  python -m vlpre.data.convert --mode=table --table=pairs.parquet --out_dir=out/mydata
"""
from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import os
import sys
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from vlpre import storage
from vlpre.data import interleaved
from vlpre.data import shard_writer
from vlpre.data import sources as sources_lib

# ---------------------------------------------------------------------------- sources


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _file_loader(path: str, extra: dict[str, bytes]) -> Callable[[], tuple[bytes, dict[str, bytes]]]:
  def load() -> tuple[bytes, dict[str, bytes]]:
    with open(path, "rb") as f:
      return f.read(), extra
  return load


def read_captions(path: str, *, image_column: str = "filename",
                  caption_column: str = "caption") -> dict[str, list[str]]:
  """image -> captions from a CSV, parquet or JSONL table, in row order.

  CSV and parquet: one row per (image, caption), several rows per image allowed. JSONL:
  one object per line whose `caption_column` holds a caption, or `<caption_column>s` a
  list of them.
  """
  captions: dict[str, list[str]] = collections.defaultdict(list)
  if path.endswith((".jsonl", ".json")):
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        row = json.loads(line)
        value = row.get(caption_column + "s", row.get(caption_column))
        if image_column not in row or value is None:
          raise ValueError(f"{path}:{line_no}: need {image_column!r} and {caption_column!r} "
                           f"or {caption_column + 's'!r}")
        captions[row[image_column]].extend([value] if isinstance(value, str) else list(value))
    return dict(captions)
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  # only parquet tables need it
    columns = pq.read_schema(path).names
    rows = None
  else:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      columns, rows = reader.fieldnames or [], list(reader)
  if not {image_column, caption_column} <= set(columns):
    raise ValueError(f"{path}: needs the columns {image_column!r} and {caption_column!r} "
                     f"(--image_column, --caption_column); it has {list(columns)}")
  if rows is None:
    rows = pq.read_table(path, columns=[image_column, caption_column]).to_pylist()
  for row in rows:
    captions[str(row[image_column])].append(row[caption_column] or "")
  return dict(captions)


def _caption_samples(captions: dict[str, list[str]], images_dir: str, where: str,
                     key: Callable[[str], str]) -> tuple[list[shard_writer.Sample], list[str]]:
  """Samples `<key>.<img>` + `<key>.json` {"captions", "filename"} of an image -> captions
  table (paths relative to `images_dir`; `where` names the table in errors), and the rows
  skipped."""
  samples, missing = [], []
  for filename, caps in captions.items():
    if "://" in filename:
      raise ValueError(f"{where}: image {filename!r} is a URL: this converter reads local "
                       "files; download them first (img2dataset's shards are read as they are)")
    path = storage.join_inside(images_dir, filename, what=f"{where}: image")
    caps = [c.strip() for c in caps if c and c.strip()]
    if not os.path.isfile(path):
      missing.append(filename)
      continue
    if not caps:
      missing.append(f"{filename} (no non-empty caption)")
      continue
    meta = json.dumps({"captions": caps, "filename": filename}, ensure_ascii=False).encode("utf-8")
    samples.append((key(filename), _file_loader(path, {"json": meta})))
  return samples, missing


def _write_caption_samples(samples: list[shard_writer.Sample], missing: list[str], out_dir: str,
                           split: str, samples_per_shard: int, resize: int | None,
                           image_format: str) -> shard_writer.ConvertStats:
  stats = shard_writer.write_samples(samples, out_dir, split, samples_per_shard, resize,
                                     image_format)
  if missing:
    logging.warning("%d captioned files skipped (missing image or caption), e.g. %s",
                    len(missing), missing[:5])
    stats.num_bad += len(missing)
    stats.bad += [f"{m}: missing" for m in missing]
  return stats


def convert_captions(images_dir: str, captions_path: str, out_dir: str, *, split: str = "train",
                     samples_per_shard: int = 1000, resize: int | None = None,
                     image_format: str = "auto") -> shard_writer.ConvertStats:
  """(a) Image folder + captions file -> `<key>.<img>` + `<key>.json` {"captions", "filename"}."""
  samples, missing = _caption_samples(read_captions(captions_path), images_dir,
                                      f"{captions_path}: filename", shard_writer.make_key)
  return _write_caption_samples(samples, missing, out_dir, split, samples_per_shard, resize,
                                image_format)


def convert_table(table: str, out_dir: str, *, images_dir: str | None = None,
                  image_column: str = "image", caption_column: str = "caption",
                  split: str = "train", samples_per_shard: int = 1000, resize: int | None = None,
                  image_format: str = "auto") -> shard_writer.ConvertStats:
  """(f) A CSV or parquet table of (image path, caption) rows -> shards as in (a).

  Paths are relative to `images_dir` (default: the table's folder); one that leaves it
  (absolute, or '..' above it) is refused, as every name read from a data file is
  (`storage.join_inside`). Rows of the same image become one sample with all its
  captions. Keys are the paths with '/' (and '.', ' ') turned into '_', so images of the
  same name in different folders stay apart.
  """
  base = images_dir or os.path.dirname(os.path.abspath(table))
  captions = read_captions(table, image_column=image_column, caption_column=caption_column)

  def key(filename: str) -> str:
    return shard_writer.make_key(os.path.normpath(filename).replace(os.sep, "/").replace("/", "_"))

  samples, missing = _caption_samples(captions, base, table, key)
  return _write_caption_samples(samples, missing, out_dir, split, samples_per_shard, resize,
                                image_format)


def convert_class_folders(images_dir: str, out_dir: str, *, split: str = "train",
                          samples_per_shard: int = 1000, resize: int | None = None,
                          image_format: str = "auto") -> shard_writer.ConvertStats:
  """(b) `<images_dir>/<class>/<img>` -> `<key>.<img>` + `<key>.cls`, plus classnames.json.

  Class index = position in the sorted folder names (ImageNet convention); keys are
  `<class>_<file stem>`.
  """
  classes = sorted(d for d in os.listdir(images_dir)
                   if os.path.isdir(os.path.join(images_dir, d)) and not d.startswith("."))
  if not classes:
    raise FileNotFoundError(f"no class subfolders in {images_dir}")
  samples = []
  for label, name in enumerate(classes):
    folder = os.path.join(images_dir, name)
    for filename in sorted(os.listdir(folder)):
      if filename.startswith(".") or not filename.lower().endswith(_IMAGE_SUFFIXES):
        continue
      key = shard_writer.make_key(f"{name}_{filename}")
      samples.append((key, _file_loader(os.path.join(folder, filename),
                                        {"cls": str(label).encode("ascii")})))
  stats = shard_writer.write_samples(samples, out_dir, split, samples_per_shard, resize,
                                     image_format)
  _write_classnames(out_dir, classes)
  return stats


def convert_tfds(name: str, tfds_split: str, out_dir: str, *, split: str | None = None,
                 data_dir: str | None = None, samples_per_shard: int = 1000,
                 resize: int | None = None, image_format: str = "auto",
                 label_key: str | None = "label", text_key: str | None = None
                 ) -> shard_writer.ConvertStats:
  """(c) A prepared TFDS dataset, read with TfdsSource, -> shards (+ classnames.json)."""
  source = sources_lib.TfdsSource(name, tfds_split, data_dir, label_key=label_key, text_key=text_key)
  width = len(str(max(len(source) - 1, 0)))

  def loader(i: int) -> Callable[[], tuple[bytes, dict[str, bytes]]]:
    def load() -> tuple[bytes, dict[str, bytes]]:
      record = source[i]
      if "_bad" in record:
        raise ValueError(record["_bad"])
      image_ext = next(e for e in sources_lib.IMAGE_EXTS if e in record)
      return record[image_ext], {k: v for k, v in record.items() if k in ("cls", "json")}
    return load

  # Zero-padded indices as keys: sorted keys keep the TFDS order.
  samples = [(f"{i:0{width}d}", loader(i)) for i in range(len(source))]
  stats = shard_writer.write_samples(samples, out_dir, split or tfds_split.split("[")[0],
                                     samples_per_shard, resize, image_format)
  if getattr(source, "classnames", None) and label_key:
    _write_classnames(out_dir, source.classnames)
  return stats


# Class names of known IDX datasets, in label order.
IDX_CLASSNAMES = {
    "fashion_mnist": ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                      "sneaker", "bag", "ankle boot"],
    "mnist": [str(d) for d in range(10)],
}
# The file-name prefix of each split in the MNIST distribution, and the split it becomes.
IDX_SPLITS = {"train": "train", "t10k": "test"}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (MNIST format, optionally gzipped) as an array of its declared shape.

  Header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then
  each dimension as a big-endian uint32. A file shorter than its header declares (an
  interrupted download) is an error, not a silently short dataset.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
    raise ValueError(f"{path}: not an IDX file of uint8 (magic {data[:4].hex()})")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  offset = 4 + 4 * ndim
  size = int(np.prod(shape))
  if len(data) - offset != size:
    raise ValueError(f"{path}: holds {len(data) - offset} bytes of data, its header declares "
                     f"{shape} = {size}")
  return np.frombuffer(data, np.uint8, size, offset).reshape(shape)


def convert_idx(idx_dir: str, out_dir: str, *, classnames: str | list[str] = "fashion_mnist",
                samples_per_shard: int = 10_000, max_per_split: int = 0
                ) -> dict[str, shard_writer.ConvertStats]:
  """(d) `<split>-images-idx3-ubyte[.gz]` + `-labels-idx1-ubyte[.gz]` -> PNG + .cls shards.

  Both MNIST splits (`train` → train, `t10k` → test) are written, keys `<split>_<NNNNN>`
  in file order, images as lossless grayscale PNGs (the pipeline decodes them to RGB),
  plus classnames.json. `max_per_split` > 0 keeps only the first that many of each.
  """
  names = IDX_CLASSNAMES[classnames] if isinstance(classnames, str) else list(classnames)
  result = {}
  for prefix, split in IDX_SPLITS.items():
    paths = {}
    for kind, dims in (("images", 3), ("labels", 1)):
      stem = os.path.join(idx_dir, f"{prefix}-{kind}-idx{dims}-ubyte")
      found = [p for p in (stem + ".gz", stem) if os.path.isfile(p)]
      if not found:
        raise FileNotFoundError(f"{stem}[.gz] not found (Fashion-MNIST: apt-get install "
                                "dataset-fashion-mnist)")
      paths[kind] = found[0]
    images_NxHxW, labels_N = read_idx(paths["images"]), read_idx(paths["labels"])
    if images_NxHxW.ndim != 3 or labels_N.shape != images_NxHxW.shape[:1]:
      raise ValueError(f"{idx_dir}/{prefix}: {images_NxHxW.shape} images, {labels_N.shape} labels")
    if labels_N.max(initial=0) >= len(names):
      raise ValueError(f"{paths['labels']}: label {labels_N.max()} ≥ {len(names)} class names")
    count = min(len(labels_N), max_per_split) if max_per_split else len(labels_N)
    width = len(str(len(labels_N) - 1))

    def loader(i: int) -> Callable[[], tuple[bytes, dict[str, bytes]]]:
      def load() -> tuple[bytes, dict[str, bytes]]:
        out = io.BytesIO()
        Image.fromarray(images_NxHxW[i]).save(out, format="PNG", optimize=False)
        return out.getvalue(), {"cls": str(int(labels_N[i])).encode("ascii")}
      return load

    samples = [(f"{split}_{i:0{width}d}", loader(i)) for i in range(count)]
    result[split] = shard_writer.write_samples(samples, out_dir, split, samples_per_shard, None,
                                               "png")
  _write_classnames(out_dir, names)
  return result


def _write_classnames(out_dir: str, names: list[str]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "classnames.json"), "w", encoding="utf-8") as f:
    json.dump(list(names), f, indent=0, ensure_ascii=False)
    f.write("\n")


# -------------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_enum("mode", None, ["captions", "table", "classes", "tfds", "idx", "interleaved"],
                    "What to convert.")
  flags.DEFINE_string("out_dir", None, "Output directory for the shards.")
  flags.DEFINE_string("split", "train", "Shard name prefix: <out_dir>/<split>-%05d.tar.")
  flags.DEFINE_integer("samples_per_shard", 1000, "Samples per tar shard.")
  flags.DEFINE_integer("resize", 0, "Resize the shorter side to this (LANCZOS); 0 keeps the size.")
  flags.DEFINE_enum("image_format", "auto", ["auto", "jpg", "png"],
                    "Output encoding; auto keeps JPEG/PNG sources as they are.")
  flags.DEFINE_string("images_dir", None, "(captions, classes) image folder; (table) the "
                      "folder relative image paths start from (default: the table's).")
  flags.DEFINE_string("captions", None, "(captions) CSV (filename,caption) or JSONL file.")
  flags.DEFINE_string("table", None, "(table) CSV or parquet file of (image path, caption) rows.")
  flags.DEFINE_string("image_column", "image", "(table) column of the image paths.")
  flags.DEFINE_string("caption_column", "caption", "(table) column of the captions.")
  flags.DEFINE_string("tfds_name", None, "(tfds) dataset name.")
  flags.DEFINE_string("tfds_split", "train", "(tfds) split.")
  flags.DEFINE_string("tfds_data_dir", None, "(tfds) TFDS data dir.")
  flags.DEFINE_string("tfds_label_key", "label", "(tfds) label feature ('' for none).")
  flags.DEFINE_string("tfds_text_key", "", "(tfds) caption feature ('' for none).")
  flags.DEFINE_string("idx_dir", "/usr/share/datasets/fashion-mnist", "(idx) folder of IDX files.")
  flags.DEFINE_enum("idx_classnames", "fashion_mnist", sorted(IDX_CLASSNAMES),
                    "(idx) which dataset's class names.")
  flags.DEFINE_integer("idx_max_per_split", 0, "(idx) keep the first N of each split (0: all).")
  flags.DEFINE_string("pairs", "flickr8k/train-*.tar",
                      "(interleaved) image-caption tar glob, relative to --data_dir.")
  flags.DEFINE_string("data_dir", None, "(interleaved) data dir of --pairs (None: "
                      "$VLPRE_DATA_DIR, else ../shared/data).")
  flags.DEFINE_integer("doc_min_images", 2, "(interleaved) fewest images per document.")
  flags.DEFINE_integer("doc_max_images", 4, "(interleaved) most images per document.")
  flags.DEFINE_integer("seed", 0, "(interleaved) seed of the group sizes and captions.")
  flags.DEFINE_bool("skip_existing", False, "(interleaved) if <out_dir>/<split>.jsonl "
                    "exists, say so and exit 0 without rebuilding it.")


def main(argv: list[str]) -> None:
  del argv
  try:
    _convert()
  except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
    print(f"vlpre.data.convert: {e}", file=sys.stderr)
    sys.exit(1)


def _convert() -> None:
  if not FLAGS.mode or not FLAGS.out_dir:
    raise app.UsageError("--mode and --out_dir are required")
  if FLAGS.mode == "interleaved":
    path = os.path.join(FLAGS.out_dir, f"{FLAGS.split}.jsonl")
    if FLAGS.skip_existing and os.path.exists(path):
      print(f"{path} exists; skipping (--skip_existing)")
      return
    counts = interleaved.build_flickr_interleaved(
        FLAGS.data_dir, path, pattern=FLAGS.pairs, min_images=FLAGS.doc_min_images,
        max_images=FLAGS.doc_max_images, seed=FLAGS.seed)
    print(f"wrote {counts['documents']} documents of {counts['images']} images to {path}; "
          f"their images stay in {FLAGS.pairs}")
    return
  resize = FLAGS.resize or None
  common = dict(samples_per_shard=FLAGS.samples_per_shard, resize=resize,
                image_format=FLAGS.image_format)
  if FLAGS.mode == "captions":
    if not FLAGS.images_dir or not FLAGS.captions:
      raise app.UsageError("--mode=captions needs --images_dir and --captions")
    stats = convert_captions(FLAGS.images_dir, FLAGS.captions, FLAGS.out_dir, split=FLAGS.split, **common)
  elif FLAGS.mode == "table":
    if not FLAGS.table:
      raise app.UsageError("--mode=table needs --table (a .csv or .parquet file)")
    try:
      stats = convert_table(FLAGS.table, FLAGS.out_dir, images_dir=FLAGS.images_dir,
                            image_column=FLAGS.image_column, caption_column=FLAGS.caption_column,
                            split=FLAGS.split, **common)
    except (OSError, ValueError) as e:  # a missing table, a wrong column, a URL: one line
      print(f"{FLAGS.table}: {e}" if FLAGS.table not in str(e) else str(e), file=sys.stderr)
      sys.exit(1)
  elif FLAGS.mode == "classes":
    if not FLAGS.images_dir:
      raise app.UsageError("--mode=classes needs --images_dir")
    stats = convert_class_folders(FLAGS.images_dir, FLAGS.out_dir, split=FLAGS.split, **common)
  elif FLAGS.mode == "idx":
    per_split = convert_idx(FLAGS.idx_dir, FLAGS.out_dir, classnames=FLAGS.idx_classnames,
                            samples_per_shard=FLAGS.samples_per_shard,
                            max_per_split=FLAGS.idx_max_per_split)
    stats = shard_writer.ConvertStats(
        num_written=sum(s.num_written for s in per_split.values()),
        num_bad=sum(s.num_bad for s in per_split.values()),
        shards=[p for s in per_split.values() for p in s.shards],
        bad=[b for s in per_split.values() for b in s.bad])
  else:
    if not FLAGS.tfds_name:
      raise app.UsageError("--mode=tfds needs --tfds_name")
    stats = convert_tfds(FLAGS.tfds_name, FLAGS.tfds_split, FLAGS.out_dir, split=FLAGS.split,
                         data_dir=FLAGS.tfds_data_dir, label_key=FLAGS.tfds_label_key or None,
                         text_key=FLAGS.tfds_text_key or None, **common)
  print(f"wrote {stats.num_written} samples in {len(stats.shards)} shards to {FLAGS.out_dir}; "
        f"skipped {stats.num_bad} bad samples")
  for line in stats.bad[:20]:
    print(f"  bad: {line}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
