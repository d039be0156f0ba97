"""Length-bucketed batching for embedding many texts with a frozen encoder.

Captions are mostly far shorter than `max_len`; padding every batch to `max_len` wastes
most of an LLM's compute. Sorting texts by token count and trimming each batch's
padding to a multiple of `multiple` gives the same embeddings (right padding is masked,
and a causal decoder never attends to later positions) at a fraction of the FLOPs, with
at most max_len / multiple distinct shapes to compile.
"""
from __future__ import annotations

from collections.abc import Iterator

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
  for start in range(0, len(order_N), batch_size):
    rows = order_N[start:start + batch_size]
    length = int(min(max_len, -(-max(int(lengths_N[rows].max()), 1) // multiple) * multiple))
    pad = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
    yield rows, ids_NxL[pad, :length], mask_NxL[pad, :length]
