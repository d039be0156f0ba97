"""Sources to host record streams: what the train input, the eval input and the
interleaved-document reader share.

`make_source` opens the random-access source a config names (tar shards or a prepared
TFDS dataset). `host_records` and `HostShare` give each host its records; `SkipBad`
drops the records that a decoder flagged bad and accounts for them.

Hosts: the records of every global batch are those a single process would read, in the
same order, with the same augmentations; host p reads its contiguous share of each
(`HostShare`), so the global batch (and the loss) does not depend on how many processes
run, and no two hosts read the same record. Bad records are dropped per host, which
shifts only that host's later records. (A record stream that is packed before batching
is sliced per host first instead: `host_records`.)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import logging
import grain

from vlpre.data import sources as sources_lib
from vlpre.data import transforms as T

Record = dict[str, Any]

_DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
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


# ------------------------------------------------------------------------------- sources


def decode_image(cfg: Any) -> T.DecodeImage:
  """The image decoder of `cfg` (member extension(s) `image_key`; None tries them all),
  refusing images over `transforms.max_image_pixels(cfg.image_size)` pixels."""
  image_key = cfg_get(cfg, "image_key")
  image_keys = (image_key,) if isinstance(image_key, str) else tuple(image_key or _DEFAULT_IMAGE_KEYS)
  max_pixels = T.max_image_pixels(cfg_get(cfg, "image_size", 0) or 0)
  return T.DecodeImage(image_keys, max_pixels=max_pixels)


def make_source(cfg: Any, split_field: str = "train", *, labels: bool | None = None,
                captions: bool | None = None) -> Any:
  """The random-access source named by `cfg` (tar shards or a prepared TFDS dataset).

  Args:
    cfg: kind ("tar" | "tfds"), data_dir, `split_field` (tar glob(s)), index_dir, tfds_name,
      tfds_split, optional tfds_image_key / tfds_label_key / tfds_text_key.
    split_field: the cfg field holding the tar glob(s).
    labels, captions: which TFDS features to read; default from cfg.label.
  """
  kind = cfg_get(cfg, "kind", "tar")
  if kind == "tar":
    return sources_lib.TarShardSource(cfg_get(cfg, split_field), data_dir=cfg_get(cfg, "data_dir"),
                                      index_dir=cfg_get(cfg, "index_dir", "") or "")
  if kind == "tfds":
    use_label = bool(cfg_get(cfg, "label", False))
    labels = use_label if labels is None else labels
    captions = (not use_label) if captions is None else captions
    return sources_lib.TfdsSource(
        cfg_get(cfg, "tfds_name"), cfg_get(cfg, "tfds_split", "train"),
        data_dir=cfg_get(cfg, "data_dir"),
        image_key=cfg_get(cfg, "tfds_image_key", "image"),
        label_key=cfg_get(cfg, "tfds_label_key", "label") if labels else None,
        text_key=cfg_get(cfg, "tfds_text_key", "captions") if captions else None)
  raise ValueError(f"unknown data kind {kind!r}; use 'tar' or 'tfds' (a method reads other "
                   "kinds itself: vlpre.methods.InputExtras.records)")


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
  if cfg_get(cfg, "shuffle", True):
    ds = ds.shuffle()
  return ds.repeat(None)  # infinite; reseeds shuffle and augmentations every epoch
