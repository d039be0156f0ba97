"""Training and evaluation input pipelines built from grain datasets.

Train: source -> host slice -> shuffle -> repeat -> typed transforms -> to_iter_dataset
-> SkipBad -> [a method's stream transform, e.g. packing] -> batch -> mp_prefetch (worker
processes) or thread prefetch. Everything before `to_iter_dataset` is a grain MapDataset,
so the iterator state is a handful of integers and a restored run sees exactly the
batches it would have seen; a stream transform built from grain's iterator datasets
(whose iterators checkpoint their own state) keeps that property.

Hosts: the records of every global batch are those a single process would read, in the
same order, with the same augmentations; host p reads its contiguous share of each
(`HostShare`), so the global batch (and the loss) does not depend on how many processes
run, and no two hosts read the same record. Bad records are dropped per host, which
shifts only that host's later records. (Interleaved documents are sliced per host
before packing instead: `host_records`.)

Batch layout (per host, b = global_batch_size // process_count):
  "image":     float32 [b, H, W, 3], CLIP-normalized
  "text":      int32 [b, L]  and "text_mask": int32 [b, L]   (caption data)
  "label":     int32 [b]                                     (cfg.label=True)
  "_key":      object ndarray [b] of sample keys
  "_num_bad":  int, samples dropped as bad while this batch was assembled
Keys starting with "_" are host-only: never put them on devices. A stream transform
changes the layout to its own (e.g. packed "tokens" with "tokens_segment_ids" and
"tokens_positions"; "_key" then holds each row's list of keys).

cfg.kind = "interleaved" reads interleaved image-text documents instead of pairs, packed
into fixed-length rows (vlpre.data.interleaved, which documents that layout); it shares
everything here but the per-record transforms and the packing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
import grain
import numpy as np

from vlpre.data import sources as sources_lib
from vlpre.data import tokenizers as tokenizers_lib
from vlpre.data import transforms as T

Record = dict[str, Any]
# A method's transformation of the record stream before batching (build_train_dataset).
StreamTransform = Callable[[grain.IterDataset], grain.IterDataset]

_DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
  """`cfg.name` for ConfigDicts, dataclasses and plain dicts alike, else `default`."""
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  try:
    value = getattr(cfg, name)
  except (AttributeError, KeyError):
    return default
  return default if value is None and default is not None else value


# ------------------------------------------------------------------------------ SkipBad


class _SkipBadIterator(grain.DatasetIterator):
  """Iterator of `SkipBad`; see there."""

  def __init__(self, parent: grain.DatasetIterator, max_logged: int, max_consecutive_bad: int):
    super().__init__(parent)
    self._max_logged = max_logged
    self._max_consecutive_bad = max_consecutive_bad
    self._pending = 0  # bad records since the last emitted one
    self._total = 0  # bad records seen by this iterator
    self._logged = 0

  def __next__(self) -> Record:
    consecutive = 0
    while True:
      record = next(self._parent)
      reason = record.get(T.BAD) if isinstance(record, dict) else None
      if reason is None:
        break
      self._pending += 1
      self._total += 1
      consecutive += 1
      if self._logged < self._max_logged:
        self._logged += 1
        logging.warning("skipping bad sample (%d so far): %s%s", self._total, reason,
                        "" if self._logged < self._max_logged else
                        " [further bad samples are counted, not logged]")
      if consecutive >= self._max_consecutive_bad:
        raise RuntimeError(
            f"{consecutive} bad samples in a row (last: {reason}); the data or the "
            "pipeline config (image_key, caption_field, label) is probably wrong")
    record = dict(record)
    record["_num_bad"] = self._pending
    self._pending = 0
    return record

  def get_state(self) -> dict[str, Any]:
    # JSON-serializable: grain's orbax handler stores it with json.dumps.
    return {"parent": self._parent.get_state(), "pending": self._pending,
            "total_bad": self._total, "logged": self._logged}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = int(state["pending"])
    self._total = int(state["total_bad"])
    self._logged = int(state["logged"])

  @property
  def total_bad(self) -> int:
    return self._total

  def __str__(self) -> str:
    return "SkipBadDatasetIterator"


class SkipBad(grain.IterDataset):
  """Drops records flagged `"_bad"` and accounts for them on the next good record.

  Each emitted record gets `"_num_bad"`: how many bad records were dropped since the
  previously emitted one, so summing it over a batch gives the bad samples skipped
  while assembling that batch, and summing over batches gives the total, also across
  `mp_prefetch` workers (where this iterator lives in a worker process and its own
  counters are out of reach). The first `max_logged` reasons are logged.

  An IterDataset (not a MapDataset filter) because dropping changes the element count;
  the state is exact: the parent's state plus the counters.

  Args:
    parent: records that may carry "_bad".
    max_logged: how many bad-sample reasons each iterator logs.
    max_consecutive_bad: raise after this many bad samples in a row instead of spinning
      forever over an infinitely repeated, entirely unreadable dataset.
  """

  def __init__(self, parent: grain.IterDataset, *, max_logged: int = 10,
               max_consecutive_bad: int = 10_000):
    super().__init__(parent)
    self._max_logged = max_logged
    self._max_consecutive_bad = max_consecutive_bad

  def __iter__(self) -> _SkipBadIterator:
    return _SkipBadIterator(self._parent.__iter__(), self._max_logged, self._max_consecutive_bad)

  def __str__(self) -> str:
    return f"SkipBad(max_logged={self._max_logged})"


# ------------------------------------------------------------------------------ batching


class HostBatch:
  """grain batch_fn: stacks array fields, sums "_num_bad", keeps keys as "_key".

  Non-array fields (strings, lists) are kept host-side under "_<name>" as object arrays;
  counts named "_num_<what>" are summed like "_num_bad"; other "_"-prefixed fields are
  dropped. A record that a stream transform merged from several (a packed row, with
  "_num_bad" and "__key__" as grain's non-sequence meta features) holds a list of counts
  and of keys: the counts are summed too. A class, not a closure, so it pickles to
  grain's worker processes.
  """

  def __call__(self, records: Sequence[Record]) -> dict[str, Any]:
    if not records:
      raise ValueError("cannot batch 0 records")
    batch: dict[str, Any] = {}
    for name in records[0]:
      if name == "__key__":
        batch["_key"] = _object_array([r[name] for r in records])
      elif name.startswith("_num_"):  # "_num_bad", and counts such as "_num_dropped_images"
        batch[name] = int(sum(np.sum(r.get(name, 0), dtype=np.int64) for r in records))
      elif name.startswith("_"):
        continue
      else:
        values = [r[name] for r in records]
        if isinstance(values[0], (np.ndarray, np.generic, int, float, bool)):
          batch[name] = np.stack([np.asarray(v) for v in values])
        else:
          batch["_" + name] = _object_array(values)
    batch.setdefault("_num_bad", 0)
    return batch


def _object_array(values: Sequence[Any]) -> np.ndarray:
  """1-D object array (element-wise, so list values are not turned into a 2-D array)."""
  out = np.empty(len(values), dtype=object)
  for i, value in enumerate(values):
    out[i] = value
  return out


# ------------------------------------------------------------------------------- train


def _ensure_absl_flags_parsed() -> None:
  """Works around grain 0.2.18 reading absl flags in mp_prefetch (google/grain#1355).

  With jax imported, grain's worker start reads `--grain_enable_multiprocess_worker_profiling`
  and raises UnparsedFlagAccessError unless absl flags were parsed, which is the case
  in pytest, notebooks and any script not run through `absl.app.run`. Marking them
  parsed (not re-parsing argv) leaves every flag at its default; `app.run` still parses
  argv normally later.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def decode_image(cfg: Any) -> T.DecodeImage:
  """The image decoder of `cfg` (member extension(s) `image_key`; None tries them all)."""
  image_key = _cfg_get(cfg, "image_key")
  image_keys = (image_key,) if isinstance(image_key, str) else tuple(image_key or _DEFAULT_IMAGE_KEYS)
  return T.DecodeImage(image_keys)


def image_augment(cfg: Any) -> list[grain.transforms.Transformation]:
  """Crop (`augment`), optional flip and CLIP normalisation of a decoded "image"."""
  image_size = int(cfg.image_size)
  resize_size = int(_cfg_get(cfg, "resize_size", 0) or round(image_size * 8 / 7))
  augment = _cfg_get(cfg, "augment", "resize_random_crop")
  if augment == "resize_random_crop":
    ops: list[Any] = [T.ResizeRandomCrop(resize_size, image_size)]
  elif augment == "random_resized_crop":
    ops = [T.RandomResizedCrop(image_size, scale=tuple(_cfg_get(cfg, "crop_scale", (0.08, 1.0))))]
  elif augment == "center_crop":
    ops = [T.ResizeCenterCrop(resize_size, image_size)]
  else:
    raise ValueError(f"unknown augment {augment!r}; use resize_random_crop, "
                     "random_resized_crop or center_crop")
  if _cfg_get(cfg, "flip", False):
    ops.append(T.RandomFlip())
  ops.append(T.Normalize(T.CLIP_MEAN, T.CLIP_STD))
  return ops


def train_transforms(cfg: Any, tokenizer: tokenizers_lib.Tokenizer | None, *,
                     extra_transforms: Sequence[grain.transforms.Transformation] = (),
                     extra_keys: Sequence[str] = ()) -> list[grain.transforms.Transformation]:
  """The per-example transforms of `build_train_dataset`, as a typed list.

  `extra_transforms` run after the standard ones, on records that still hold
  "__key__", "caption" and "caption_index"; the fields in `extra_keys` they add are
  kept (and batched) next to image/text/label.
  """
  use_label = bool(_cfg_get(cfg, "label", False))
  ops: list[Any] = [decode_image(cfg)]
  if use_label:
    ops.append(T.ParseLabel())
  else:
    if tokenizer is None and not extra_keys:
      raise ValueError("caption data needs a tokenizer (or set cfg.label=True, or join "
                       "precomputed text embeddings through extra_transforms/extra_keys)")
    ops.append(T.ParseCaption(_cfg_get(cfg, "caption_field", "captions"), pick="random"))
  ops.extend(image_augment(cfg))
  if use_label:
    keep = ["image", "label"]
  elif tokenizer is None:  # captions only select the precomputed embedding joined below
    keep = ["image"]
  else:
    ops.append(T.Tokenize(tokenizer, int(_cfg_get(cfg, "max_text_len", 77))))
    keep = ["image", "text", "text_mask"]
  ops.extend(extra_transforms)
  ops.append(T.KeepKeys(keep + list(extra_keys)))
  return ops


def make_source(cfg: Any, split_field: str = "train", *, labels: bool | None = None,
                captions: bool | None = None) -> Any:
  """The random-access source named by `cfg` (tar shards or a prepared TFDS dataset).

  Args:
    cfg: kind ("tar" | "tfds"), data_dir, `split_field` (tar glob(s)), tfds_name,
      tfds_split, optional tfds_image_key / tfds_label_key / tfds_text_key.
    split_field: the cfg field holding the tar glob(s).
    labels, captions: which TFDS features to read; default from cfg.label.
  """
  kind = _cfg_get(cfg, "kind", "tar")
  if kind == "tar":
    return sources_lib.TarShardSource(_cfg_get(cfg, split_field), data_dir=_cfg_get(cfg, "data_dir"))
  if kind == "tfds":
    use_label = bool(_cfg_get(cfg, "label", False))
    labels = use_label if labels is None else labels
    captions = (not use_label) if captions is None else captions
    return sources_lib.TfdsSource(
        _cfg_get(cfg, "tfds_name"), _cfg_get(cfg, "tfds_split", "train"),
        data_dir=_cfg_get(cfg, "data_dir"),
        image_key=_cfg_get(cfg, "tfds_image_key", "image"),
        label_key=_cfg_get(cfg, "tfds_label_key", "label") if labels else None,
        text_key=_cfg_get(cfg, "tfds_text_key", "captions") if captions else None)
  raise ValueError(f"unknown data kind {kind!r}; use 'tar' or 'tfds'")


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
  fmt = _cfg_get(cfg, "format", "vlpre")
  where, data_dir = _cfg_get(cfg, field), _cfg_get(cfg, "data_dir")
  if not where:
    raise ValueError(f"no {field!r} given")
  if fmt == "vlpre":
    return EvalSplit(sources_lib.TarShardSource(where, data_dir=data_dir))
  if fmt == "clip_benchmark":
    source = sources_lib.ClipBenchmarkSource(where, _cfg_get(cfg, "split", "test"), data_dir)
    return EvalSplit(source, source.classnames, source.templates)
  if fmt == "tfds":
    source = sources_lib.TfdsSource(
        where, _cfg_get(cfg, "split", "test"), _cfg_get(cfg, "tfds_data_dir"),
        image_key=_cfg_get(cfg, "tfds_image_key", "image"),
        label_key=_cfg_get(cfg, "tfds_label_key", "label") if labels else None,
        text_key=_cfg_get(cfg, "tfds_text_key", "captions") if captions else None)
    return EvalSplit(source, source.classnames)
  raise ValueError(f"unknown eval format {fmt!r}; use one of {', '.join(EVAL_FORMATS)}")


class HostShare(grain.MapDataset):
  """Host `process_index`'s share of every global batch of `parent`, in order.

  Global batch s holds elements [s*B, (s+1)*B) of `parent` (B = host_batch *
  process_count); this host reads [s*B + p*b, s*B + (p+1)*b) of it (b = host_batch, p =
  process_index), which are the rows that `jax.make_array_from_process_local_data` puts
  on this host's devices. Random transforms applied before it are seeded by the
  element's global index, so every host count sees the same records with the same
  augmentations.
  """

  def __init__(self, parent: grain.MapDataset, *, process_index: int, process_count: int,
               host_batch: int):
    super().__init__(parent)
    self._p, self._b, self._global = process_index, host_batch, host_batch * process_count
    self._length = len(parent) // self._global * host_batch

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    step, offset = divmod(index, self._b)
    return step * self._global + self._p * self._b + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems([self._parent_index(i) for i in indices])  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"HostShare(host {self._p}, {self._b} of every {self._global})"


def host_records(source: Any, cfg: Any, *, seed: int, process_index: int, process_count: int,
                 host_batch: int) -> grain.MapDataset:
  """This host's records of `source`: sliced, shuffled and repeated forever.

  The slice is `[process_index::process_count]`; the shuffle (cfg.shuffle, default on)
  is seeded with `seed` and differs every epoch. A MapDataset, so the iterator state
  stays a handful of integers.
  """
  ds = grain.MapDataset.source(source).seed(seed)
  ds = ds[process_index::process_count]
  if len(ds) < host_batch:
    logging.warning("host %d holds %d samples of %r, fewer than its batch of %d",
                    process_index, len(ds), source, host_batch)
  if _cfg_get(cfg, "shuffle", True):
    ds = ds.shuffle()
  return ds.repeat(None)  # infinite; reseeds shuffle and augmentations every epoch


def build_train_dataset(cfg: Any, *, global_batch_size: int, seed: int,
                        tokenizer: tokenizers_lib.Tokenizer | None,
                        process_index: int = 0, process_count: int = 1,
                        extra_transforms: Sequence[grain.transforms.Transformation] = (),
                        extra_keys: Sequence[str] = (),
                        stream: StreamTransform | None = None,
                        start_record: int = 0) -> grain.IterDataset:
  """Infinite, shuffled, augmented, batched training data for this host.

  See the module docstring for the batch layout. `iter(ds)` is checkpointable with
  `get_state`/`set_state` or `grain.checkpoint.CheckpointSave/CheckpointRestore`.

  Args:
    cfg: attribute object (ml_collections.ConfigDict, dict, dataclass) with
      data_dir: str|None (see resolve_data_dir; TFDS data dir for kind="tfds").
      train: shard glob or list of globs, relative to data_dir (kind="tar").
      kind: "tar" | "tfds" | "interleaved"; tfds_name, tfds_split (kind="tfds"; optional
        tfds_image_key/tfds_label_key/tfds_text_key, default image/label/captions);
        interleaved documents take the fields of `vlpre.data.interleaved.train_records`
        and are packed before `stream`.
      image_key: member extension(s) of the image; None tries jpg, jpeg, png, webp.
      caption_field: JSON field holding the caption(s) ("captions").
      label: emit "label" from .cls instead of "text"/"text_mask".
      image_size, resize_size: crop size and shorter-side resize (default 8/7 x).
      augment: "resize_random_crop" | "random_resized_crop" (scale: crop_scale,
        default (0.08, 1)) | "center_crop"; flip: random left-right flips.
      max_text_len: tokens per caption, incl. start/end (77).
      num_workers: 0 decodes in this process (num_read_threads threads, default 4);
        N > 0 uses N grain worker processes (mp_prefetch), each with its slice.
      prefetch_buffer_size: batches buffered ahead, per worker process (N > 0) or in
        a background thread (N = 0; 0 disables).
      shuffle: global shuffle of the host's samples, reshuffled every epoch.
    global_batch_size: summed over hosts; must divide by process_count.
    seed: shuffle and augmentation seed (same on every host: hosts read disjoint records).
    tokenizer: for captions; unused (may be None) with cfg.label=True.
    process_index, process_count: this host's share of every global batch (`HostShare`;
      interleaved documents: the slice `[process_index::process_count]`).
    extra_transforms, extra_keys: per-example additions, e.g. joining cached text
      embeddings by "__key__"/"caption_index"; see `train_transforms`.
    stream: a method's transformation of the whole record stream, applied after bad
      records are dropped and before batching: for what one record at a time cannot do,
      such as packing variable-length token sequences into fixed-length rows
      (grain.experimental.FirstFitPackIterDataset / BestFitPackIterDataset /
      ConcatThenSplitIterDataset). Records it receives hold the kept fields plus
      "__key__" and "_num_bad"; declaring those two as the packer's `meta_features`
      keeps the keys and the bad-sample accounting. Called once here; with
      num_workers > 0 the datasets it returns run in the worker processes, so they
      must pickle. Batches then hold `host_batch` of its output elements.
    start_record: the global record stream (the one a single process reads) starts at
      this record, augmentation draws included (each record keeps its index); each host
      then reads its share. Interleaved documents, sliced per host before packing, skip
      `start_record // process_count` of the host's documents. How a resume under
      another process count continues (`vlpre.train.data_position`).
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} does not split over {process_count} hosts")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  host_batch = global_batch_size // process_count
  if start_record < 0:
    raise ValueError(f"start_record must be >= 0, got {start_record}")
  kind_stream = None
  if _cfg_get(cfg, "kind", "tar") == "interleaved":
    # Imported here: vlpre.data.interleaved builds on this module.
    from vlpre.data import interleaved  # pylint: disable=g-import-not-at-top
    ds, kind_stream = interleaved.train_records(
        cfg, seed=seed, tokenizer=tokenizer, process_index=process_index,
        process_count=process_count, host_batch=host_batch)
    if start_record:
      ds = ds[start_record // process_count:]
  else:
    # The global record stream (the one a single process reads), then this host's share.
    ds = host_records(make_source(cfg), cfg, seed=seed, process_index=0, process_count=1,
                      host_batch=global_batch_size)
    ds = ds.apply(train_transforms(cfg, tokenizer, extra_transforms=extra_transforms,
                                  extra_keys=extra_keys))
    if start_record:
      ds = ds[start_record:]
    if process_count > 1:
      ds = HostShare(ds, process_index=process_index, process_count=process_count,
                     host_batch=host_batch)

  num_workers = int(_cfg_get(cfg, "num_workers", 0))
  prefetch = int(_cfg_get(cfg, "prefetch_buffer_size", 0) or 0)
  # Decoding threads inside each process. PIL releases the GIL while decoding.
  threads = int(_cfg_get(cfg, "num_read_threads", 0) or (2 if num_workers else 4))
  # Read-ahead in elements: enough to keep the threads busy, bounded so that big
  # batches of float32 images do not pile up in memory.
  read_options = grain.ReadOptions(num_threads=threads,
                                   prefetch_buffer_size=max(4 * threads, min(host_batch, 256)))
  it_ds = ds.to_iter_dataset(read_options)
  it_ds = SkipBad(it_ds)
  if kind_stream is not None:
    it_ds = kind_stream(it_ds)
  if stream is not None:
    it_ds = stream(it_ds)
  it_ds = it_ds.batch(host_batch, drop_remainder=True, batch_fn=HostBatch())
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)))
  elif prefetch > 0:
    # Assemble the next batches in a background thread while the step runs. The
    # iterator state stays exact: it is the state at the last batch handed out.
    it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
  return it_ds


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
                 max_examples: int = 0) -> EvalBatches:
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
    source = make_source(cfg, "pattern", labels=with_labels, captions=with_captions)
  keys = (image_key,) if isinstance(image_key, str) else tuple(image_key or _DEFAULT_IMAGE_KEYS)
  ops: list[Any] = [T.DecodeImage(keys)]
  if with_labels:
    ops.append(T.ParseLabel())
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
                     (image_size, image_size, 3), repr(source))


def _as_dict(cfg: Any) -> dict[str, Any]:
  if isinstance(cfg, dict):
    return dict(cfg)
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
    return cfg.to_dict()
  return dict(vars(cfg))


def load_classnames(dataset_dir_name: str, data_dir: str | None = None) -> list[str]:
  """Class names, in label order, from `<data_dir>/<dataset_dir_name>/classnames.json`."""
  path = os.path.join(sources_lib.resolve_data_dir(data_dir), dataset_dir_name, "classnames.json")
  with open(path, encoding="utf-8") as f:
    names = json.load(f)
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"{path} must hold a JSON list of strings")
  return names
