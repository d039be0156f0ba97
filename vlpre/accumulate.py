"""Gradient accumulation: one optimiser step over `config.accum_steps` chunks of the batch.

    loss, metrics, grads, model_state = accumulate.value_and_grad(
        apply, loss_fn, params, model_state, batch, rng, steps)

`apply(params, model_state, batch, rng) -> (outputs, new model_state)` runs the model on
a batch (train mode, frozen parameters inside); `loss_fn` has the losses' one signature.
Each chunk holds batch rows k, k + steps, k + 2·steps, ... of every device's share, so a
chunk is spread over the devices as the batch is and splitting it moves no data. Only
the activations of one chunk are alive at a time. How the step splits depends on how the
loss reduces over the batch (vlpre/losses/reduction.py):

  per-example   (softmax CE, next-token CE, cosine): plain microbatching. Each chunk's
                loss and gradient are computed on their own and combined as the mean
                weighted by what the loss averages over (rows, or e.g. the chunk's target
                tokens), which is the whole batch's loss and gradient.
  batch-coupled (CLIP, SigLIP, any loss that says nothing): open_clip's accum-freq. Pass
                1 runs the model on every chunk without gradients and keeps the outputs
                (the embeddings); the loss and its gradient with respect to those outputs
                are then computed once, over the whole global batch (every negative
                counts); pass 2 reruns each chunk and pulls that chunk's share of the
                gradient back to the parameters (a VJP). The sum over chunks is the
                whole batch's gradient: the same update as without accumulation.

Model outputs are per-example (a leading batch dimension) or do not depend on the batch
(`logit_scale`), whose gradient is shared out over the chunks. The rng of chunk k is
`fold_in(rng, k)` in both passes, so a chunk's rerun draws the same dropout. Mutable
collections (BatchNorm statistics) are threaded through the chunks in order; BatchNorm
then normalises each chunk by its own statistics, as microbatching does in any
framework, so a BatchNorm model's accumulated step is not the unaccumulated one.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vlpre.losses import reduction

Apply = Callable[[Any, Any, dict, jax.Array], tuple[dict, Any]]


def steps_problem(per_device_batch: int, steps: int) -> str | None:
  """Why `steps` chunks do not fit a per-device batch (None: they do)."""
  if not isinstance(steps, int) or steps < 1:
    return f"accum_steps: {steps!r} is not a positive integer"
  if per_device_batch % steps:
    return (f"accum_steps: {steps} does not divide the per-device batch {per_device_batch} "
            "(batch_size / data × fsdp devices)")
  return None


def split(tree: Any, steps: int) -> Any:
  """Every leaf [B, ...] → [steps, B/steps, ...]: chunk k holds rows k, k + steps, ..."""
  def one(x):
    if x.shape[0] % steps:
      raise ValueError(f"accum_steps {steps} does not divide the batch's {x.shape[0]} rows")
    return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)
  return jax.tree.map(one, tree)


def merge(tree: Any) -> Any:
  """The inverse of `split`: [steps, B/steps, ...] → [B, ...] in the batch's order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def value_and_grad(apply: Apply, loss_fn: Callable, params: Any, model_state: Any,
                   batch: dict, rng: jax.Array, steps: int = 1
                   ) -> tuple[jax.Array, dict, Any, Any]:
  """(loss, metrics, gradient with respect to `params`, new model_state) of one step over
  `batch` in `steps` chunks (module docstring); `steps == 1` is the plain step."""
  if steps == 1:
    def compute(params):
      outputs, new_model_state = apply(params, model_state, batch, rng)
      loss, metrics = loss_fn(outputs, batch)
      return loss, (metrics, new_model_state)
    (loss, (metrics, new_model_state)), grads = jax.value_and_grad(compute, has_aux=True)(params)
    return loss, metrics, grads, new_model_state
  count = reduction.count_of(loss_fn)
  if count is None:
    return _coupled(apply, loss_fn, params, model_state, batch, rng, steps)
  return _microbatched(apply, loss_fn, count, params, model_state, batch, rng, steps)


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def _microbatched(apply, loss_fn, count, params, model_state, batch, rng, steps):
  """Per-example losses: Σ_k n_k·∇loss_k / Σ_k n_k, n_k what chunk k's loss averages over."""
  def chunk_step(carry, chunk_and_index):
    model_state, grad_sum = carry
    chunk, k = chunk_and_index

    def compute(params):
      outputs, new_model_state = apply(params, model_state, chunk, jax.random.fold_in(rng, k))
      loss, metrics = loss_fn(outputs, chunk)
      return loss, (metrics, new_model_state)

    (loss, (metrics, new_model_state)), grads = jax.value_and_grad(compute, has_aux=True)(params)
    n = (jnp.float32(jax.tree.leaves(chunk)[0].shape[0]) if count == reduction.EXAMPLES
         else metrics[count].astype(jnp.float32))
    grad_sum = jax.tree.map(lambda s, g: s + n * g, grad_sum, grads)
    return (new_model_state, grad_sum), (loss, metrics, n)

  (new_model_state, grad_sum), (losses, metrics, n) = jax.lax.scan(
      chunk_step, (model_state, _zeros_like(params)), (split(batch, steps), jnp.arange(steps)))
  total = jnp.maximum(jnp.sum(n), 1.0)  # a loss over no units is 0 with no gradient
  weights = n / total
  grads = jax.tree.map(lambda s: (s / total).astype(s.dtype), grad_sum)
  # Metrics are the same weighted means, except the count itself, which adds up.
  metrics = {name: jnp.sum(values) if name == count else jnp.sum(weights * values)
             for name, values in metrics.items()}
  return jnp.sum(weights * losses), metrics, grads, new_model_state


def _is_inexact(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def _inexact_leaves(tree) -> list:
  """The floating-point outputs: integer ones (targets, masks) carry no gradient."""
  return [x for x in jax.tree.leaves(tree) if _is_inexact(x)]


def _is_per_example(stacked: jax.Array, full: jax.ShapeDtypeStruct, steps: int) -> bool:
  """Whether a model output (stacked over chunks) has a batch dimension: True when the
  whole batch gives `steps` times its rows, False when its shape does not depend on it."""
  chunk = stacked.shape[1:]
  if chunk and tuple(full.shape) == (steps * chunk[0], *chunk[1:]):
    return True
  if tuple(full.shape) == chunk:
    return False
  raise ValueError(f"a model output has shape {chunk} for a chunk of the batch and "
                   f"{tuple(full.shape)} for the whole batch: accumulation needs outputs "
                   "that are per-example (leading batch dimension) or batch-independent")


def _coupled(apply, loss_fn, params, model_state, batch, rng, steps):
  """Batch-coupled losses: outputs of every chunk kept, loss over the whole batch, then
  each chunk rerun and its share of the output gradient pulled back (module docstring)."""
  chunks, indices = split(batch, steps), jnp.arange(steps)

  def forward(model_state, chunk_and_index):  # pass 1: no gradient, only the outputs
    chunk, k = chunk_and_index
    outputs, new_model_state = apply(params, model_state, chunk, jax.random.fold_in(rng, k))
    return new_model_state, outputs

  _, stacked = jax.lax.scan(forward, model_state, (chunks, indices))
  full_shapes = jax.eval_shape(lambda: apply(params, model_state, batch, rng)[0])
  per_example = jax.tree.map(lambda x, full: _is_per_example(x, full, steps), stacked,
                             full_shapes)
  outputs = jax.tree.map(lambda x, rows: merge(x) if rows else x[0], stacked, per_example)

  leaves, treedef = jax.tree.flatten(outputs)
  inexact = [_is_inexact(x) for x in leaves]

  def loss_of_inexact(inexact_leaves):
    it = iter(inexact_leaves)
    return loss_fn(treedef.unflatten([next(it) if f else x for x, f in zip(leaves, inexact)]),
                   batch)

  (loss, metrics), cotangents = jax.value_and_grad(loss_of_inexact, has_aux=True)(
      _inexact_leaves(outputs))
  rows = [r for r, f in zip(jax.tree.leaves(per_example), inexact) if f]
  # Chunk k's share: its rows of a per-example output's gradient, 1/steps of a shared one's.
  chunk_cotangents = [split(c, steps) if r else jnp.broadcast_to(c / steps, (steps, *c.shape))
                      for c, r in zip(cotangents, rows)]

  def backward(carry, chunk_index_cotangent):  # pass 2: rerun, pull the chunk's share back
    model_state, grad_sum = carry
    chunk, k, cotangent = chunk_index_cotangent

    def inexact_outputs(params):
      outputs, new_model_state = apply(params, model_state, chunk, jax.random.fold_in(rng, k))
      return _inexact_leaves(outputs), new_model_state

    _, pull_back, new_model_state = jax.vjp(inexact_outputs, params, has_aux=True)
    (grads,) = pull_back(cotangent)
    return (new_model_state, jax.tree.map(jnp.add, grad_sum, grads)), None

  (new_model_state, grads), _ = jax.lax.scan(
      backward, (model_state, _zeros_like(params)), (chunks, indices, chunk_cotangents))
  return loss, metrics, grads, new_model_state
