"""Random-access data sources that grain can shard, shuffle and checkpoint.

Every source returns webdataset-style records: a dict with `"__key__"` (str) and one
entry per member extension, without the dot (`"jpg"`, `"json"`, `"cls"`, ...), holding
the raw bytes. Decoding is left to the transforms (vlpre.data.transforms) so it runs in
grain's worker processes and a corrupt sample becomes a counted bad record instead of
an exception in the reader.

Why random access (rather than streaming tars): grain's MapDataset gives a global
shuffle, exact per-host slicing and a tiny, exact checkpoint state (an index), which a
streaming reader cannot.
"""
from __future__ import annotations

import glob
import json
import os
import pathlib
import threading
from collections.abc import Sequence
from typing import Any

from etils import epath
import numpy as np

from vlpre import storage
from vlpre.data import tar_index
from vlpre.data import tar_scan

DATA_DIR_ENV = "VLPRE_DATA_DIR"

# Image extensions in the order a converter or reader prefers them.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def resolve_data_dir(path: str | None = None) -> str:
  """Returns the data directory: `$VLPRE_DATA_DIR`, else `path`, else `<repo>/../shared/data`.

  The env var wins over the config so one launch command can point every job at a
  different (e.g. local SSD) copy without editing configs. A `gs://` URI stays one
  (tar shards are read from the bucket: `TarShardSource`).

  Raises:
    FileNotFoundError: the chosen directory does not exist.
  """
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    chosen, origin = env, f"${DATA_DIR_ENV}"
  elif path:
    chosen, origin = path, "the data_dir argument"
  else:
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    chosen, origin = str(repo_root.parent / "shared" / "data"), "the default <repo>/../shared/data"
  chosen = os.fspath(storage.path(chosen, what="data_dir"))
  if not (epath.Path(chosen).is_dir() if storage.is_uri(chosen) else os.path.isdir(chosen)):
    raise FileNotFoundError(
        f"data directory {chosen!r} (from {origin}) does not exist; set ${DATA_DIR_ENV} or "
        "pass data_dir to point at the directory holding the dataset folders")
  return chosen


def _is_absolute(pattern: str) -> bool:
  return os.path.isabs(pattern) or storage.is_uri(pattern)


def _glob(pattern: str) -> list[str]:
  """The files `pattern` matches, sorted: a local glob, or epath's in a bucket (where the
  parts before the first wildcard are the folder it lists). Hidden names are skipped in
  a bucket as a local glob skips them, so index folders (`.vlpre_index`) never match."""
  if not storage.is_uri(pattern):
    return sorted(glob.glob(pattern))
  parts = pattern.split("/")
  fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
  folder = "/".join(parts[:fixed])
  matched = (os.fspath(p) for p in epath.Path(folder).glob("/".join(parts[fixed:])))
  return sorted(p for p in matched
                if not any(part.startswith(".") for part in p[len(folder) + 1:].split("/")))


def _expand_patterns(patterns: str | Sequence[str], data_dir: str | None) -> list[str]:
  """Globs `patterns` (relative to the data dir, or absolute: a path or a `gs://` URI)
  into a sorted shard list."""
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  patterns = [os.fspath(p) for p in patterns]
  if not patterns:
    raise ValueError("no shard patterns given")
  base = None
  if any(not _is_absolute(p) for p in patterns):
    base = resolve_data_dir(data_dir)
  shards: list[str] = []
  for pattern in patterns:
    full = pattern if _is_absolute(pattern) else os.path.join(base, pattern)
    matched = _glob(full)
    if not matched:
      raise FileNotFoundError(f"shard pattern {pattern!r} matches no file (looked for {full!r})")
    shards.extend(matched)
  return shards


# --------------------------------------------------------------------------- tar shards


class _FdCache:
  """Per-process cache of open shards (`tar_scan.open_reader`), at most `max_open` at a time.

  grain reads a MapDataset from several threads at once, so reads are positioned
  (`os.pread`: a seek and read in one call, no shared file position; a bucket shard
  locks its own) and a reference count keeps a shard open while a read is using it
  even if the cache evicts it meanwhile.
  """

  def __init__(self, max_open: int = 128):
    self._max_open = max_open
    self._lock = threading.Lock()
    self._fds: dict[str, list[Any]] = {}  # path -> [reader, refcount, evicted]

  def pread(self, path: str, offset: int, size: int) -> bytes:
    with self._lock:
      entry = self._fds.pop(path, None)
      if entry is None:
        entry = [tar_scan.open_reader(path), 0, 0]
      self._fds[path] = entry  # re-insert: dict order is the LRU order
      entry[1] += 1
      while len(self._fds) > self._max_open:
        old_path = next(iter(self._fds))
        old = self._fds.pop(old_path)
        old[2] = 1
        if old[1] == 0:
          old[0].close()
    try:
      return tar_scan.read_exact(entry[0], size, offset)
    finally:
      with self._lock:
        entry[1] -= 1
        if entry[2] and entry[1] == 0:
          entry[0].close()

  def forget(self, path: str) -> None:
    """Drops `path`'s reader (closed once unused), so the next read reopens the file."""
    with self._lock:
      entry = self._fds.pop(path, None)
      if entry is not None:
        entry[2] = 1
        if entry[1] == 0:
          entry[0].close()

  def close(self) -> None:
    with self._lock:
      for reader, refs, _ in self._fds.values():
        if refs == 0:
          reader.close()
      self._fds.clear()


_FD_INIT_LOCK = threading.Lock()


class TarShardSource:
  """grain random-access source over webdataset-style tar shards.

  Construction scans only the tar headers (a few ms per shard) and maps each sample
  index to the byte ranges of its members; `__getitem__` then reads them directly.
  Files are opened lazily in each process (never in `__init__`), so the source pickles
  to grain workers as just the index.

  Damaged data never raises here: what indexing found (cut-off members, bad headers,
  unreadable shards; see vlpre.data.tar_index) and what reading finds (a shard deleted
  or cut after indexing, an I/O error, retried once on a fresh descriptor) come out as
  records flagged "_bad", which the pipelines skip and count.

  Args:
    patterns: glob(s) relative to `data_dir` (absolute globs, local or `gs://`, are used
      as is), e.g. "flickr8k/train-*.tar". Matches are sorted, patterns keep their order.
    data_dir: see `resolve_data_dir` ($VLPRE_DATA_DIR wins over this argument).
    index_dir: where the shards' indexes persist (`tar_index.get_index`): "" beside
      shards in a bucket; a folder (local or `gs://`) for any shards.
  """

  def __init__(self, patterns: str | Sequence[str], data_dir: str | None = None,
               index_dir: str = ""):
    self._patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    self._shards = _expand_patterns(patterns, data_dir)
    self._index = tar_index.get_index(self._shards, index_dir=index_dir)
    self._fds: _FdCache | None = None
    self._pid = -1

  @property
  def shards(self) -> tuple[str, ...]:
    return self._index.shards

  def __len__(self) -> int:
    return len(self._index)

  def _fd_cache(self) -> _FdCache:
    # Per process: a forked child gets its own descriptors (ownership stays simple).
    # The lock is module-level because a lock attribute would not pickle.
    fds = self._fds
    if fds is None or self._pid != os.getpid():
      with _FD_INIT_LOCK:
        if self._fds is None or self._pid != os.getpid():
          self._fds, self._pid = _FdCache(), os.getpid()
        fds = self._fds
    return fds

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    n = len(self._index)
    if not -n <= index < n:
      raise IndexError(f"sample index {index} out of range for {n} samples")
    index %= n
    idx = self._index
    key = idx.keys[index]
    if index in idx.bad_reasons:
      return {"__key__": key, "_bad": idx.bad_reasons[index]}
    path = idx.shards[idx.sample_shard[index]]
    fds = self._fd_cache()
    try:
      return self._read(index, path, fds)
    except OSError:
      fds.forget(path)  # a stale or broken descriptor: retry once on a fresh one
    try:
      return self._read(index, path, fds)
    except OSError as e:
      fds.forget(path)
      return {"__key__": key, "_bad": f"{path}: cannot read sample {key!r} ({type(e).__name__}: {e})"}

  def _read(self, index: int, path: str, fds: _FdCache) -> dict[str, Any]:
    """The sample's members, read as one byte range: they are adjacent in the shard, so a
    sample in a bucket costs one request, not one per member."""
    idx = self._index
    first, end = int(idx.sample_start[index]), int(idx.sample_start[index + 1])
    offsets, sizes = idx.member_offset[first:end], idx.member_size[first:end]
    start = int(offsets.min()) if end > first else 0
    span = fds.pread(path, start, int((offsets + sizes).max()) - start) if end > first else b""
    record: dict[str, Any] = {"__key__": idx.keys[index]}
    for m, offset, size in zip(range(first, end), offsets, sizes):
      record[idx.exts[idx.member_ext[m]]] = span[offset - start:offset - start + size]
    return record

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state["_fds"], state["_pid"] = None, -1
    return state

  def __repr__(self) -> str:
    # grain includes the repr in its pipeline summaries and error messages.
    return (f"TarShardSource(patterns={self._patterns!r}, shards={len(self._shards)}, "
            f"samples={len(self)})")


# ------------------------------------------------------- clip_benchmark's webdataset layout


def _read_lines(path: str) -> list[str] | None:
  """The non-empty stripped lines of a UTF-8 text file; None if it does not exist."""
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def _shard_number(path: str) -> tuple[int, str]:
  stem = os.path.basename(path)[:-len(".tar")]
  return (int(stem), "") if stem.isdigit() else (1 << 62, stem)


class ClipBenchmarkSource:
  """grain random-access source over an eval set in clip_benchmark's webdataset layout.

      <root>/<split>/0.tar, 1.tar, ...     (nshards.txt beside them is optional here)
      <root>/classnames.txt                 one class name a line, in label order
      <root>/zeroshot_classification_templates.txt   one prompt a line, "{c}" for the name

  Samples: `<key>.webp|png|jpg` and `<key>.cls` (classification, an ASCII class index) or
  `<key>.txt` (retrieval: the image's captions, one a line). A `.txt` member comes out as
  `"json": {"captions": [its lines]}`, the form the caption transforms read (a lone `.txt`
  in vlpre's own shards is one caption); all else as `TarShardSource` reads it.

  Args:
    root: the dataset folder, absolute or relative to the data dir (`resolve_data_dir`).
    split: the subfolder holding the shards ("test").
    data_dir: see `resolve_data_dir`.
  """

  def __init__(self, root: str, split: str = "test", data_dir: str | None = None):
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isabs(root):
      root = os.path.join(resolve_data_dir(data_dir), root)
    split_dir = os.path.join(root, split)
    shards = sorted(glob.glob(os.path.join(glob.escape(split_dir), "*.tar")), key=_shard_number)
    if not shards:
      raise FileNotFoundError(
          f"{split_dir} holds no .tar shards (clip_benchmark's layout: <root>/<split>/0.tar, ...)")
    self.root, self.split = root, split
    self.classnames = _read_lines(os.path.join(root, "classnames.txt"))
    self.templates = _read_lines(os.path.join(root, "zeroshot_classification_templates.txt"))
    self._tars = TarShardSource(shards)

  @property
  def shards(self) -> tuple[str, ...]:
    return self._tars.shards

  def __len__(self) -> int:
    return len(self._tars)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._tars[index]
    if "txt" in record and "json" not in record and "_bad" not in record:
      try:
        lines = [c.strip() for c in bytes(record.pop("txt")).decode("utf-8").splitlines()]
      except UnicodeDecodeError as e:
        return {"__key__": record["__key__"], "_bad": f"{record['__key__']!r}: .txt is not UTF-8 ({e})"}
      record["json"] = json.dumps({"captions": [c for c in lines if c]}).encode("utf-8")
    return record

  def __repr__(self) -> str:
    return f"ClipBenchmarkSource(root={self.root!r}, split={self.split!r}, samples={len(self)})"


# --------------------------------------------------------------------------------- TFDS


def _sniff_image_ext(data: bytes) -> str:
  """Picks the webdataset extension for encoded image bytes from their magic number."""
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  return "jpg"  # JPEG (FF D8) and anything else PIL can sniff by itself


def _to_text_list(value: Any) -> list[str]:
  if isinstance(value, (bytes, np.bytes_)):
    return [bytes(value).decode("utf-8", errors="strict")]
  if isinstance(value, str):
    return [value]
  if isinstance(value, dict):  # e.g. coco_captions: {"captions": {"text": [...], "id": [...]}}
    value = value.get("text", next(iter(value.values())))
  return [t for v in np.asarray(value, dtype=object).reshape(-1) for t in _to_text_list(v)]


class TfdsSource:
  """grain random-access source over a locally prepared TFDS dataset (array_record).

  Records come in the tar form so every transform works unchanged:
    * `image_key` (encoded bytes, TFDS `SkipDecoding`) -> "jpg" / "png" / "webp" by magic
      number; decoding happens in `DecodeImage`, like for tars, so corrupt images are
      counted rather than fatal.
    * `label_key` (int) -> "cls": ASCII bytes, like a `.cls` tar member.
    * `text_key` (Text or Sequence(Text)) -> "json": `{"captions": [...]}`.
  Other features are dropped.

  Reading needs no TensorFlow. There is no network here, so the dataset must already be
  prepared in `data_dir` with `file_format="array_record"`.

  Args:
    name: TFDS name, optionally with config/version ("cifar10:3.0.2"), or the folder of a
      prepared dataset version (the one holding `dataset_info.json`).
    split: TFDS split spec ("train", "test[:10%]").
    data_dir: TFDS data dir; None means TFDS's default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, *,
               image_key: str | None = "image", label_key: str | None = "label",
               text_key: str | None = None):
    self._name, self._split, self._data_dir = name, split, data_dir
    self._image_key, self._label_key, self._text_key = image_key, label_key, text_key
    self.classnames: list[str] | None = None
    self.num_classes: int | None = None
    self._source = self._open()  # here, so a missing dataset fails at construction
    self._len = len(self._source)

  def _open(self) -> Any:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: TFDS sources only)
    name, data_dir = self._name, self._data_dir
    try:
      if os.path.isfile(os.path.join(os.path.expanduser(name), "dataset_info.json")):
        # A prepared dataset's own folder (<data_dir>/<name>/<config>/<version>): read
        # from its files alone, so neither its builder code nor its catalogue entry is needed.
        builder = tfds.builder_from_directory(os.path.expanduser(name))
      else:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is unknown and not prepared in data_dir={data_dir!r} "
          f"({type(e).__name__}); prepare it with `tfds build {name} "
          "--file_format=array_record` on a machine with network access") from None
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; there is no "
          f"network here, so build it elsewhere (`tfds build {name} "
          "--file_format=array_record`) and copy it into the TFDS data dir")
    features = builder.info.features
    for key in (self._image_key, self._label_key, self._text_key):
      if key is not None and key not in features:
        raise KeyError(f"TFDS dataset {name!r} has no feature {key!r}; it has {list(features)}")
    decoders = {}
    if self._image_key is not None:
      decoders[self._image_key] = tfds.decode.SkipDecoding()
    try:
      source = builder.as_data_source(self._split, decoders=decoders)
    except NotImplementedError as e:
      raise ValueError(
          f"TFDS dataset {name!r} in {builder.data_dir!r} is not stored as array_record "
          f"(random access needs it): rebuild with --file_format=array_record. ({e})") from None
    if self._label_key is not None and hasattr(features[self._label_key], "names"):
      self.classnames = list(features[self._label_key].names)
      self.num_classes = len(self.classnames)
    return source

  def __getstate__(self) -> dict[str, Any]:
    # Reopened lazily in each grain worker: the TFDS data source drags its builder
    # along, which need not pickle (e.g. builders defined in a function).
    state = self.__dict__.copy()
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if self._source is None:
      self._source = self._open()
    raw = self._source[index]
    record: dict[str, Any] = {"__key__": f"{self._name}/{self._split}/{index}"}
    if self._image_key is not None:
      data = raw[self._image_key]
      data = bytes(data) if not isinstance(data, bytes) else data
      record[_sniff_image_ext(data)] = data
    if self._label_key is not None:
      record["cls"] = str(int(raw[self._label_key])).encode("ascii")
    if self._text_key is not None:
      try:
        captions = _to_text_list(raw[self._text_key])
        record["json"] = json.dumps({"captions": captions}).encode("utf-8")
      except UnicodeDecodeError:
        record["_bad"] = f"non-UTF-8 text in TFDS feature {self._text_key!r}"
    return record

  def __repr__(self) -> str:
    return (f"TfdsSource(name={self._name!r}, split={self._split!r}, "
            f"data_dir={self._data_dir!r}, samples={len(self)})")
