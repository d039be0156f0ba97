"""Length-bucketed batching for embedding many texts with a frozen encoder.

Captions are mostly far shorter than `max_len`; padding every batch to `max_len` wastes
most of an LLM's compute. Sorting texts by token count and trimming each batch's
padding to a multiple of `multiple` gives the same embeddings (right padding is masked,
and a causal decoder never attends to later positions) at a fraction of the FLOPs, with
at most max_len / multiple distinct shapes to compile.

`TrimTextPadding` does the same for training batches (a frozen LLM in
the step): each batch's token columns are cut to the smallest of a few bucket lengths
(`length_buckets`) that holds its longest row, so the step compiles once per bucket.
"""
from __future__ import annotations

from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils
import numpy as np


def bucketed_batches(ids_NxL: np.ndarray, mask_NxL: np.ndarray, batch_size: int,
                     multiple: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (row indices [b], ids [batch_size, l], mask [batch_size, l]) covering all rows.

  Rows are grouped by length; the last batch is padded with copies of its last row
  (callers keep only the first len(indices) outputs), so shapes stay fixed per bucket.
  """
  lengths_N = mask_NxL.sum(axis=1)
  order_N = np.argsort(lengths_N, kind="stable")
  max_len = ids_NxL.shape[1]
  buckets = tuple(range(multiple, max_len, multiple)) + (max_len,)
  for start in range(0, len(order_N), batch_size):
    rows = order_N[start:start + batch_size]
    length = bucket_length(int(lengths_N[rows].max()), buckets)
    pad = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
    yield rows, ids_NxL[pad, :length], mask_NxL[pad, :length]


def length_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """smallest·(1, 2, 3, 4, 6, 8, 12, 16, ...): powers of two and 1.5× them, below
  max_len, then max_len itself; 77 → (16, 32, 48, 64, 77), 256 → (16, ..., 192, 256)."""
  buckets, size = [], smallest
  while size < max_len:
    buckets.append(size)
    if size * 3 // 2 < max_len and size >= 2 * smallest:
      buckets.append(size * 3 // 2)
    size *= 2
  return tuple(sorted(set(buckets))) + (max_len,)


def bucket_length(longest: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket ≥ longest (at least one column); the largest bucket if none is."""
  return next((b for b in buckets if b >= max(longest, 1)), buckets[-1])


def used_columns(mask_BxL: np.ndarray) -> int:
  """1 + the last column any row uses (right padding is what lies after it)."""
  used_L = np.asarray(mask_BxL).any(axis=0)
  return int(used_L.nonzero()[0][-1]) + 1 if used_L.any() else 0


class TrimTextPadding:
  """batch → batch with `keys` ([B, L] token arrays) cut to a bucket length.

  Only trailing columns that every row leaves as padding are removed (1 + the last
  column `mask_key` marks in any row, rounded up to a bucket), so each row's tokens and
  mask are unchanged up to that length: a causal decoder's states, a bidirectional
  encoder's (padding is masked out of attention) and every pooling (last token, EOS,
  mean, first; the template's own last token for PromptEOL) read the same values.
  Buckets: `buckets` below the batch's width L, then L; default `length_buckets(L)`.
  In a multi-process run the processes agree on the longest length (one all-gather),
  so the global batch has one shape.
  """

  def __init__(self, buckets: tuple[int, ...] | None = None,
               keys: tuple[str, ...] = ("text", "text_mask"), mask_key: str = "text_mask"):
    self.buckets = tuple(sorted(buckets)) if buckets else None
    self.keys, self.mask_key = keys, mask_key

  def buckets_for(self, width: int) -> tuple[int, ...]:
    if self.buckets is None:
      return length_buckets(width)
    return tuple(b for b in self.buckets if b < width) + (width,)

  def __call__(self, batch: dict) -> dict:
    if self.mask_key not in batch:
      return batch
    mask_BxL = np.asarray(batch[self.mask_key])
    length = bucket_length(used_columns(mask_BxL), self.buckets_for(mask_BxL.shape[1]))
    if jax.process_count() > 1:
      length = int(np.max(multihost_utils.process_allgather(np.int32(length))))
    return {k: (np.asarray(v)[:, :length] if k in self.keys else v) for k, v in batch.items()}
