"""The training input: records -> typed transforms -> batches, built from grain datasets.

source -> host slice -> shuffle -> repeat -> typed transforms -> to_iter_dataset ->
SkipBad -> [a method's stream transform, e.g. packing] -> batch -> mp_prefetch (worker
processes) or thread prefetch. Everything before `to_iter_dataset` is a grain MapDataset,
so the iterator state is a handful of integers and a restored run sees exactly the
batches it would have seen; a stream transform built from grain's iterator datasets
(whose iterators checkpoint their own state) keeps that property. How hosts share the
records: vlpre.data.records.

Batch layout (per host, b = global_batch_size // process_count):
  "image":     float32 [b, H, W, 3], CLIP-normalized
  "text":      int32 [b, L]  and "text_mask": int32 [b, L]   (caption data)
  "label":     int32 [b]                                     (cfg.label=True)
  "_key":      object ndarray [b] of sample keys
  "_num_bad":  int, samples dropped as bad while this batch was assembled
Keys starting with "_" are host-only: never put them on devices. A stream transform
changes the layout to its own (e.g. packed "tokens" with "tokens_segment_ids" and
"tokens_positions"; "_key" then holds each row's list of keys).

A method that reads another kind of data (e.g. interleaved image-text documents, packed
into fixed-length rows) builds its record stream itself (`records` of
`build_train_dataset`); it shares everything here but the source and the per-record
transforms.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
import grain
import numpy as np

from vlpre.data import records as records_lib
from vlpre.data import tokenizers as tokenizers_lib
from vlpre.data import transforms as T

Record = records_lib.Record
_get = records_lib.cfg_get  # cfg: a ConfigDict, dict or dataclass
# A method's transformation of the record stream before batching (build_train_dataset).
StreamTransform = Callable[[grain.IterDataset], grain.IterDataset]
# A method's own training records (build_train_dataset's `records`): called with (cfg, *,
# seed, tokenizer, process_index, process_count, host_batch), it returns this host's
# records and the stream transform that readies them for batching (None: none).
RecordsBuilder = Callable[..., tuple[grain.MapDataset, StreamTransform | None]]


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
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def image_augment(cfg: Any) -> list[grain.transforms.Transformation]:
  """Crop (`augment`), optional flip and CLIP normalisation of a decoded "image"."""
  image_size = int(cfg.image_size)
  resize_size = int(_get(cfg, "resize_size", 0) or round(image_size * 8 / 7))
  augment = _get(cfg, "augment", "resize_random_crop")
  if augment == "resize_random_crop":
    ops: list[Any] = [T.ResizeRandomCrop(resize_size, image_size)]
  elif augment == "random_resized_crop":
    ops = [T.RandomResizedCrop(image_size, scale=tuple(_get(cfg, "crop_scale", (0.08, 1.0))))]
  elif augment == "center_crop":
    ops = [T.ResizeCenterCrop(resize_size, image_size)]
  else:
    raise ValueError(f"unknown augment {augment!r}; use resize_random_crop, "
                     "random_resized_crop or center_crop")
  if _get(cfg, "flip", False):
    ops.append(T.RandomFlip())
  ops.append(T.Normalize(T.CLIP_MEAN, T.CLIP_STD))
  return ops


def decode_transforms(cfg: Any, pick: str = "random") -> list[grain.transforms.Transformation]:
  """The decoders of a training record: its image (cfg.image_key), then its label
  (cfg.label) or one caption (cfg.caption_field), picked as `ParseCaption`'s `pick` says."""
  if _get(cfg, "label", False):
    return [records_lib.decode_image(cfg),
            T.ParseLabel(num_classes=int(_get(cfg, "num_classes", 0) or 0) or None)]
  return [records_lib.decode_image(cfg),
          T.ParseCaption(_get(cfg, "caption_field", "captions"), pick=pick)]


def train_transforms(cfg: Any, tokenizer: tokenizers_lib.Tokenizer | None, *,
                     extra_transforms: Sequence[grain.transforms.Transformation] = (),
                     extra_keys: Sequence[str] = ()) -> list[grain.transforms.Transformation]:
  """The per-example transforms of `build_train_dataset`, as a typed list.

  `extra_transforms` run after the standard ones, on records that still hold
  "__key__", "caption" and "caption_index"; the fields in `extra_keys` they add are
  kept (and batched) next to image/text/label.
  """
  use_label = bool(_get(cfg, "label", False))
  if not use_label and tokenizer is None and not extra_keys:
    raise ValueError("caption data needs a tokenizer (or set cfg.label=True, or join "
                     "precomputed text embeddings through extra_transforms/extra_keys)")
  ops: list[Any] = decode_transforms(cfg)
  ops.extend(image_augment(cfg))
  if use_label:
    keep = ["image", "label"]
  elif tokenizer is None:  # captions only select the precomputed embedding joined below
    keep = ["image"]
  else:
    ops.append(T.Tokenize(tokenizer, int(_get(cfg, "max_text_len", 77))))
    keep = ["image", "text", "text_mask"]
  ops.extend(extra_transforms)
  ops.append(T.KeepKeys(keep + list(extra_keys)))
  return ops


def build_train_dataset(cfg: Any, *, global_batch_size: int, seed: int,
                        tokenizer: tokenizers_lib.Tokenizer | None,
                        process_index: int = 0, process_count: int = 1,
                        extra_transforms: Sequence[grain.transforms.Transformation] = (),
                        extra_keys: Sequence[str] = (),
                        stream: StreamTransform | None = None,
                        records: RecordsBuilder | None = None,
                        start_record: int = 0) -> grain.IterDataset:
  """Infinite, shuffled, augmented, batched training data for this host.

  See the module docstring for the batch layout. `iter(ds)` is checkpointable with
  `get_state`/`set_state` or `grain.checkpoint.CheckpointSave/CheckpointRestore`.

  Args:
    cfg: attribute object (ml_collections.ConfigDict, dict, dataclass) with
      data_dir: str|None (see resolve_data_dir; TFDS data dir for kind="tfds").
      train: shard glob or list of globs, relative to data_dir (kind="tar").
      kind: "tar" | "tfds"; tfds_name, tfds_split (kind="tfds"; optional
        tfds_image_key/tfds_label_key/tfds_text_key, default image/label/captions);
        another kind is read by `records`, which names the fields it reads.
      image_key: member extension(s) of the image; None tries jpg, jpeg, png, webp.
      caption_field: JSON field holding the caption(s) ("captions").
      label: emit "label" from .cls instead of "text"/"text_mask"; num_classes: labels
        outside [0, num_classes) are bad records (0: only negative ones are).
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
      `records` slices per host itself, e.g. `[process_index::process_count]`).
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
    records: a method that builds its training records itself (e.g. interleaved
      documents): `records(cfg, seed=, tokenizer=, process_index=, process_count=,
      host_batch=)` returns this host's records (a MapDataset, already transformed and
      sliced per host) and a stream transform of its own (None: none), applied before
      `stream`. It replaces the source `cfg` names and the per-record transforms, so
      `extra_transforms`/`extra_keys` are unused; the rest (threads, SkipBad, batching,
      prefetch) is shared.
    start_record: the global record stream (the one a single process reads) starts at
      this record, augmentation draws included (each record keeps its index); each host
      then reads its share. A method's `records`, sliced per host, skip
      `start_record // process_count` of the host's records. How a resume under
      another process count continues (`data_position`).
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} does not split over {process_count} hosts")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  host_batch = global_batch_size // process_count
  if start_record < 0:
    raise ValueError(f"start_record must be >= 0, got {start_record}")
  records_stream = None
  if records is not None:
    ds, records_stream = records(cfg, seed=seed, tokenizer=tokenizer,
                                 process_index=process_index, process_count=process_count,
                                 host_batch=host_batch)
    if start_record:
      ds = ds[start_record // process_count:]
  else:
    # The global record stream (the one a single process reads), then this host's share.
    ds = records_lib.host_records(records_lib.make_source(cfg), cfg, seed=seed,
                                  process_index=0, process_count=1,
                                  host_batch=global_batch_size)
    ds = ds.apply(train_transforms(cfg, tokenizer, extra_transforms=extra_transforms,
                                  extra_keys=extra_keys))
    if start_record:
      ds = ds[start_record:]
    if process_count > 1:
      ds = records_lib.HostShare(ds, process_index=process_index,
                                 process_count=process_count, host_batch=host_batch)

  num_workers = int(_get(cfg, "num_workers", 0))
  prefetch = int(_get(cfg, "prefetch_buffer_size", 0) or 0)
  # Decoding threads inside each process. PIL releases the GIL while decoding.
  threads = int(_get(cfg, "num_read_threads", 0) or (2 if num_workers else 4))
  # Read-ahead in elements: enough to keep the threads busy, bounded so that big
  # batches of float32 images do not pile up in memory.
  read_options = grain.ReadOptions(num_threads=threads,
                                   prefetch_buffer_size=max(4 * threads, min(host_batch, 256)))
  it_ds = ds.to_iter_dataset(read_options)
  it_ds = records_lib.SkipBad(it_ds)
  if records_stream is not None:
    it_ds = records_stream(it_ds)
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


# ------------------------------------------------------------------------------ in the loop


class BadSampleGuard:
  """Counts skipped samples; fails once their share passes `max_fraction`.

  Bad samples are the records the input pipeline drops: undecodable images, empty or
  non-UTF-8 captions, and the samples of damaged shards (cut off, bad tar headers,
  unreadable files), which the data layer turns into bad records. The counts are saved
  with every checkpoint (`counts`, `restore`), so the share spans the whole run. In a
  multi-host run each host counts its own samples; a resume restores host 0's counts.
  """

  def __init__(self, max_fraction: float, min_samples: int = 256):
    self.max_fraction, self.min_samples = max_fraction, min_samples
    self.bad = self.good = 0

  def counts(self) -> dict[str, int]:
    return {"bad_samples": self.bad, "good_samples": self.good}

  def restore(self, counts: dict[str, int]) -> None:
    """Counts from a checkpoint; {} (a checkpoint written before they were saved) is 0, 0."""
    self.bad, self.good = int(counts.get("bad_samples", 0)), int(counts.get("good_samples", 0))

  def update(self, num_bad: int, num_good: int) -> None:
    self.bad += int(num_bad)
    self.good += int(num_good)
    seen = self.bad + self.good
    if seen >= self.min_samples and self.bad / seen > self.max_fraction:
      raise RuntimeError(
          f"{self.bad} of {seen} input samples were unreadable (corrupt image, empty or non-UTF-8 "
          f"caption, damaged or truncated shard): more than "
          f"input.max_bad_fraction={self.max_fraction}. Check the data.")

  @property
  def fraction(self) -> float:
    return self.bad / max(self.bad + self.good, 1)


def data_position(saved: dict[str, int], step: int, global_batch: int,
                  process_count: int) -> tuple[int, bool]:
  """Where the input stream starts on resume, and whether the saved iterator state applies.

  `saved`: the counters of the checkpoint at `step` ({} for a fresh run or a checkpoint
  written before they held the data position). The start is a record of the global
  stream (`build_train_dataset(start_record=...)`), the same on every process. Under the
  process count that wrote the checkpoint each process rebuilds its stream from the
  saved start and restores its iterator state: the batches continue exactly. Under
  another count no saved state applies (its positions are in other host shares), so the
  stream starts at record `step * global_batch`: global batch `step + 1` of the
  uninterrupted run, which every host count splits the same way. Exact without bad
  samples (those shift a host's later records); packed interleaved documents restart at
  `step * global_batch / process_count` of each host's documents, so some repeat. The
  mesh (devices per process) plays no part in either.
  """
  if global_batch % process_count:
    raise ValueError(f"batch_size {global_batch} does not split over {process_count} processes")
  saved_count = int(saved.get("data_process_count", process_count))
  if saved_count == process_count:
    return int(saved.get("data_start_record", 0)), True
  return step * global_batch, False


def next_batch(data_iter, step: int) -> dict:
  """The batch of `step`; a read error (a lost mount, a failing disk) names the step."""
  try:
    return next(data_iter)
  except OSError as e:
    error = OSError(f"the input of step {step} could not be read ({e}); stopping: the complete "
                    "checkpoints are intact, fix the cause and rerun to resume")
    error.errno = e.errno
    raise error from e
