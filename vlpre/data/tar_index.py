"""Indexing webdataset tar shards, and what a damaged shard becomes in the index.

`ShardIndex(shards)` maps every sample to the byte ranges of its members by reading the
tar headers only. Damage found while indexing never raises; it becomes *bad records*
that `TarShardSource` returns flagged "_bad", so the input pipeline skips and counts
them (SkipBad → "_num_bad" → data.BadSampleGuard and `input.max_bad_fraction`):

  fault                               in the index
  ----------------------------------  -------------------------------------------------
  member cut off by end of file       the whole members before it stay; the cut sample
  (an interrupted copy), or a header  is one bad record (its key), its other members go
  whose size runs past EOF            with it; if a valid header follows (a corrupt size
                                      field), the scan resumes there
  header cut off by end of file       one bad record
  bad header (checksum mismatch,      the scan resumes at the next valid ustar header
  garbage block, zeros with data      (found by its magic and checksum, at any byte);
  after them, not octal, a negative   the skipped bytes are bad records (a negative
  size field)                         size never steps the scan back: no endless loop)
  unreadable shard (permission,       bad records for its whole size
  deleted, I/O error while indexing)

Bytes lost to a fault count as ≈ lost bytes / mean bytes of an indexed sample, at least
one bad record, so losing a whole shard weighs in the bad fraction like the samples it
held, and one broken header like one sample. (A sample that lost a member to a bad
header may also fail to decode, and so count twice: the count errs on the safe side.)
Faults after indexing (a shard deleted or cut later, an I/O error on read) are the
reader's: `TarShardSource.__getitem__` turns them into bad records too.

Persisted scans: what `tar_scan.scan` lists of a shard is written to a small JSON file
(`index_file`), keyed by the shard's size and modification time, and read instead of
rescanning while those match, so 64 hosts starting on thousands of shards in a bucket
do not each read every shard (a header scan of a bucket shard downloads most of it).
By default the files sit beside shards in a bucket (`<folder>/.vlpre_index/`); local
shards scan in milliseconds and are not written to. `index_dir` puts them in another
folder (local or gs://), e.g. under the workdir when the data is read-only, for any
shards. Processes that start together scan the missing shards each in its own random
order and read what another has persisted meanwhile, so the scans are shared out
without a barrier. A scan that hit an I/O error is never persisted.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath
import numpy as np

from vlpre import storage
from vlpre.data import tar_scan

INDEX_FOLDER = ".vlpre_index"  # beside bucket shards; hidden, so no shard glob matches it
_INDEX_VERSION = 1  # bump when the persisted form changes: older files are rescanned


class ShardIndex:
  """Compact, picklable index of the samples in a list of shards (bad records included).

  Numpy arrays rather than a dict per sample: a million-sample index stays tens of MB
  and pickles to grain's worker processes in milliseconds. Bad records have no members;
  `bad_reasons` maps their sample index to the fault's line. They sit where the fault
  was, so the order of the samples is the order of the shards.

  Args:
    shards: the shard paths (local or gs://), in order.
    scans: `tar_scan.scan` of each shard, if already known (persisted); None scans them.

  Raises:
    FileNotFoundError: the shards are damaged and not one sample in them is readable.
  """

  def __init__(self, shards: Sequence[str],
               scans: Sequence[tuple[list[tar_scan.Member], list[tar_scan.Fault]]] | None = None):
    keys: list[str] = []
    sample_shard: list[int] = []
    sample_start: list[int] = [0]  # one entry per closed sample after the leading 0
    member_ext: list[int] = []
    member_offset: list[int] = []
    member_size: list[int] = []
    exts: dict[str, int] = {}
    bad_rows: list[tuple[int, tar_scan.Fault]] = []  # (sample index, the fault it stands for)
    good_bytes = open_bytes = 0  # bytes of closed good samples / of the open one

    def close_open_sample():
      nonlocal good_bytes, open_bytes
      if len(sample_start) == len(keys):
        sample_start.append(len(member_ext))
        good_bytes, open_bytes = good_bytes + open_bytes, 0

    for shard_id, path in enumerate(shards):
      members, faults = tar_scan.scan(path) if scans is None else scans[shard_id]
      faults_at: dict[int, list[tar_scan.Fault]] = {}
      for fault in faults:
        faults_at.setdefault(fault.at, []).append(fault)
      prev_key = broken = None  # the open sample's key; the key of a sample a fault cut
      for m in range(len(members) + 1):
        for fault in faults_at.get(m, ()):
          if prev_key is not None and fault.key == prev_key:  # its earlier members go with it
            del keys[-1], sample_shard[-1]
            del member_ext[sample_start[-1]:], member_offset[sample_start[-1]:]
            del member_size[sample_start[-1]:]
            open_bytes = 0
          close_open_sample()
          bad_rows.append((len(keys), fault))
          keys.append(fault.key or f"{os.path.basename(path)}#bad{len(keys)}")
          sample_shard.append(shard_id)
          sample_start.append(len(member_ext))  # no members
          prev_key, broken = None, fault.key  # no sample spans a fault
        if m == len(members):
          break
        name, offset, size, footprint = members[m]
        key, ext = tar_scan.split_name(name)
        if not ext or os.path.basename(name).startswith(".") or key == broken:
          continue  # no extension, hidden files such as macOS `._x.jpg`, a cut sample's rest
        broken = None
        if key != prev_key:  # adjacent members with one key form one sample
          close_open_sample()
          keys.append(key)
          sample_shard.append(shard_id)
          prev_key = key
        member_ext.append(exts.setdefault(ext, len(exts)))
        member_offset.append(offset)
        member_size.append(size)
        open_bytes += footprint
      close_open_sample()

    num_good = len(keys) - len(bad_rows)
    if bad_rows and not num_good:
      raise FileNotFoundError(f"no readable sample in {len(shards)} shard(s): "
                              + "; ".join(fault.reason for _, fault in bad_rows[:3]))
    # A fault stands for about as many samples as the bytes it lost would hold.
    sample_bytes = good_bytes / max(num_good, 1)
    repeats = np.ones(len(keys), np.int64)  # rows per sample: 1, or a fault's estimate
    for row, fault in bad_rows:
      repeats[row] = max(1, round(fault.lost_bytes / sample_bytes))
    starts = np.asarray(sample_start, np.int64)
    self.shards = tuple(shards)
    self.exts = tuple(exts)
    self.keys = np.repeat(np.array(keys, dtype=object), repeats)
    self.sample_shard = np.repeat(np.asarray(sample_shard, np.int32), repeats)
    self.sample_start = np.concatenate([np.repeat(starts[:-1], repeats), starts[-1:]])
    # The smallest unsigned type that numbers every distinct extension (any count).
    self.member_ext = np.asarray(member_ext, np.min_scalar_type(max(len(exts) - 1, 0)))
    self.member_offset = np.asarray(member_offset, np.int64)
    self.member_size = np.asarray(member_size, np.int64)
    first_index = np.cumsum(repeats) - repeats  # each row's first index after the repeats
    self.bad_reasons: dict[int, str] = {}
    for row, fault in bad_rows:
      count = int(repeats[row])
      logging.warning("%s: counted as %d bad sample(s)", fault.reason, count)
      for i in range(count):
        self.bad_reasons[int(first_index[row]) + i] = fault.reason + (
            f" [{i + 1} of {count}]" if count > 1 else "")

  def __len__(self) -> int:
    return len(self.keys)


# ----------------------------------------------------------------------- persisted scans


def _stat(path: str) -> tuple[int | None, int | None]:
  """(size, modification time) of a shard; (None, None) if it cannot be stat'ed."""
  try:
    if storage.is_uri(path):
      st = epath.Path(path).stat()
      return st.length, st.mtime
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  except OSError:
    return None, None


def index_file(shard: str, index_dir: str = "") -> epath.Path | None:
  """Where `shard`'s scan persists: `index_dir`/<name>-<hash of the path>.json, else beside a
  bucket shard in `.vlpre_index/<name>.json`; None for a local shard without `index_dir`."""
  name = os.path.basename(shard)
  if index_dir:
    digest = hashlib.sha1(shard.encode("utf-8")).hexdigest()[:10]
    return storage.path(index_dir, what="input.index_dir") / f"{name}-{digest}.json"
  if storage.is_uri(shard):
    return epath.Path(shard).parent / INDEX_FOLDER / f"{name}.json"
  return None


def _load_scan(file: epath.Path, stat: tuple[int | None, int | None]):
  """The persisted scan in `file` if it was made of the shard as it is now, else None."""
  try:
    saved = json.loads(file.read_text(encoding="utf-8"))
  except (OSError, ValueError):  # missing, or a partial or foreign file: rescan
    return None
  if (saved.get("version") != _INDEX_VERSION
      or [saved.get("size"), saved.get("mtime")] != list(stat)):
    return None
  members = [tuple(m) for m in saved["members"]]
  return members, [tar_scan.Fault(*f) for f in saved["faults"]]


def _save_scan(file: epath.Path, stat, members, faults) -> None:
  record = {"version": _INDEX_VERSION, "size": stat[0], "mtime": stat[1],
            "members": [list(m) for m in members],
            "faults": [[f.at, f.key, f.lost_bytes, f.reason] for f in faults]}
  try:
    file.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(file, json.dumps(record, separators=(",", ":")))
  except OSError as e:  # a read-only bucket or folder: this run still has the scan
    logging.warning("cannot persist the shard index %s (%s): every start rescans the shard; "
                    "set input.index_dir to a writable folder (e.g. under the workdir)", file, e)


def _scans(shards: Sequence[str], index_dir: str):
  """`tar_scan.scan` of every shard, read from its persisted file where one is current."""
  out: list[Any] = [None] * len(shards)
  order = list(range(len(shards)))
  random.Random().shuffle(order)  # processes starting together scan different shards first
  scanned = 0
  for i in order:
    shard, file = shards[i], index_file(shards[i], index_dir)
    stat = _stat(shard)
    if file is not None and stat[0] is not None:
      out[i] = _load_scan(file, stat)
    if out[i] is None:
      members, faults = out[i] = tar_scan.scan(shard)
      scanned += 1
      if (file is not None and stat[0] is not None and not any(f.io_error for f in faults)
          and _stat(shard) == stat):  # unchanged while it was read
        _save_scan(file, stat, members, faults)
  if scanned and len(shards) > 1:
    logging.info("indexed %d of %d shards (the rest from persisted indexes)", scanned, len(shards))
  return out


# Indexes already built in this process, keyed by the shards' (path, size, mtime): a
# second pipeline over the same shards (train + eval, tests) does not rescan or reread.
_INDEX_CACHE: dict[tuple[Any, ...], ShardIndex] = {}
_INDEX_CACHE_LOCK = threading.Lock()
_INDEX_CACHE_MAX = 16


def get_index(shards: Sequence[str], *, index_dir: str = "") -> ShardIndex:
  """The index of `shards`, built once per process for the same files, from persisted
  scans where they are current (module docstring; `index_dir` as in `index_file`)."""
  stats = tuple((p, *_stat(p)) for p in shards)
  with _INDEX_CACHE_LOCK:
    index = _INDEX_CACHE.get(stats)
  if index is None:
    index = ShardIndex(shards, _scans(shards, index_dir))
    with _INDEX_CACHE_LOCK:
      if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
      _INDEX_CACHE[stats] = index
  return index
