"""Indexing webdataset tar shards, and what a damaged shard becomes in the index.

`ShardIndex(shards)` maps every sample to the byte ranges of its members by reading the
tar headers only. Damage found while indexing never raises; it becomes *bad records*
that `TarShardSource` returns flagged "_bad", so the input pipeline skips and counts
them (SkipBad → "_num_bad" → train.BadSampleGuard and `input.max_bad_fraction`):

  fault                               in the index
  ----------------------------------  -------------------------------------------------
  member cut off by end of file       the whole members before it stay; the cut sample
  (an interrupted copy), or a header  is one bad record (its key), its other members go
  whose size runs past EOF            with it; if a valid header follows (a corrupt size
                                      field), the scan resumes there
  header cut off by end of file       one bad record
  bad header (checksum mismatch,      the scan resumes at the next valid ustar header
  garbage block, zeros with data      (found by its magic and checksum, at any byte);
  after them, not octal)              the skipped bytes are bad records
  unreadable shard (permission,       bad records for its whole size
  deleted, I/O error while indexing)

Bytes lost to a fault count as ≈ lost bytes / mean bytes of an indexed sample, at least
one bad record, so losing a whole shard weighs in the bad fraction like the samples it
held, and one broken header like one sample. (A sample that lost a member to a bad
header may also fail to decode, and so count twice: the count errs on the safe side.)
Faults after indexing (a shard deleted or cut later, an I/O error on read) are the
reader's: `TarShardSource.__getitem__` turns them into bad records too.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np

from vlpre.data import tar_scan


class ShardIndex:
  """Compact, picklable index of the samples in a list of shards (bad records included).

  Numpy arrays rather than a dict per sample: a million-sample index stays tens of MB
  and pickles to grain's worker processes in milliseconds. Bad records have no members;
  `bad_reasons` maps their sample index to the fault's line. They sit where the fault
  was, so the order of the samples is the order of the shards.

  Raises:
    FileNotFoundError: the shards are damaged and not one sample in them is readable.
  """

  def __init__(self, shards: Sequence[str]):
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
      members, faults = tar_scan.scan(path)
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
    self.member_ext = np.asarray(member_ext, np.int16)
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


# Indexes already built in this process, keyed by the shards' (path, size, mtime): a
# second pipeline over the same shards (train + eval, tests) does not rescan. Kept in
# memory only; nothing is written next to the data.
_INDEX_CACHE: dict[tuple[Any, ...], ShardIndex] = {}
_INDEX_CACHE_LOCK = threading.Lock()
_INDEX_CACHE_MAX = 16


def _stat_key(path: str) -> tuple[Any, ...]:
  try:
    st = os.stat(path)
    return path, st.st_size, st.st_mtime_ns
  except OSError:
    return path, None, None


def get_index(shards: Sequence[str]) -> ShardIndex:
  """The index of `shards`, built once per process for the same files."""
  stats = tuple(_stat_key(p) for p in shards)
  with _INDEX_CACHE_LOCK:
    index = _INDEX_CACHE.get(stats)
  if index is None:
    index = ShardIndex(shards)
    with _INDEX_CACHE_LOCK:
      if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
      _INDEX_CACHE[stats] = index
  return index
