"""How a loss reduces over the batch: what gradient accumulation may split (vlpre/accumulate.py).

A loss is batch-coupled unless it says otherwise: its value on a batch is not a mean of
its values on parts of the batch (a contrastive loss scores every pair of the global
batch), so accumulation keeps it over the whole batch. A loss that is a mean of
per-example terms says so, naming what it averages over:

    @reduction.per_example()               # the mean over the batch's examples
    def softmax_ce(outputs, batch): ...

    @reduction.per_example("num_tokens")   # the mean over what its metric `num_tokens` counts
    def lm_loss(outputs, batch): ...

Such a loss's gradient over the batch is the count-weighted mean of its gradients over
chunks of the batch, so accumulation may microbatch it.
"""
from __future__ import annotations

from typing import Callable

EXAMPLES = "examples"  # the count of a mean over examples: a chunk's number of rows


def per_example(count: str = EXAMPLES) -> Callable:
  """Marks a loss as the mean over its batch of what `count` counts: EXAMPLES, or the
  name of one of its metrics holding the number of units averaged (e.g. tokens)."""
  def mark(fn):
    fn.per_example_count = count
    return fn
  return mark


def count_of(fn: Callable) -> str | None:
  """What `fn` averages over (EXAMPLES or a metric name); None when it is batch-coupled."""
  return getattr(fn, "per_example_count", None)
