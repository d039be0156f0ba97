"""Losses: pure functions with one signature, selected and weighted by a config dict.

    loss_fn(outputs: dict, batch: dict) -> (scalar loss, dict of scalar metrics)

`config.losses = {"clip": 1.0}` names them (name → weight); `build_loss` sums them.
The shared families are files here whose `LOSSES` dict maps names to functions (listed in
`_SHARED`); a method adds its own through its descriptor (`Method.losses`, e.g. LCL's),
so a run knows the shared losses plus its method's. Fixed loss hyperparameters ride along
in the model outputs (CLIP's `logit_scale`, GPT4Image's `text_temperature`), so the config
stays name → weight.

`build_loss(..., impl="local", mesh=)` lays the losses that have a per-device form (CLIP,
SigLIP: `contrastive.local_losses`) out over the mesh's batch axes (`config.loss_impl`).
Each loss says how it reduces over the batch (`reduction`), and the sum says it too, for
gradient accumulation (vlpre/accumulate.py).
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Mapping

import jax

from vlpre.losses import classification
from vlpre.losses import contrastive
from vlpre.losses import language_modeling
from vlpre.losses import reduction
from vlpre.losses.classification import softmax_ce, text_byol, text_infonce, text_infonce_oneway
from vlpre.losses.contrastive import clip_loss, cosine_loss, info_nce, l2_normalize, siglip_loss
from vlpre.losses.language_modeling import lm_loss, next_token_cross_entropy

__all__ = [
    "LOSSES", "LossFn", "LOSS_IMPLS", "available", "build_loss", "register_loss",
    "l2_normalize", "info_nce", "clip_loss", "siglip_loss", "cosine_loss",
    "softmax_ce", "text_infonce", "text_infonce_oneway", "text_byol",
    "lm_loss", "next_token_cross_entropy",
]

LossFn = Callable[[dict, dict], tuple[jax.Array, dict]]

# `config.loss_impl`: the B×B term as one array laid out by XLA, or per device (module docstring).
LOSS_IMPLS = ("global", "local")

# The losses several methods share; a method's own losses come with its descriptor.
_SHARED: tuple[ModuleType, ...] = (contrastive, classification, language_modeling)


def _merge(families: tuple[tuple[str, Mapping[str, LossFn]], ...]) -> dict[str, LossFn]:
  """One name → loss dict from (where, losses) pairs; a name defined twice is an error,
  not a silent override."""
  merged: dict[str, LossFn] = {}
  for where, family in families:
    for name, fn in family.items():
      if name in merged and merged[name] is not fn:
        raise ValueError(f"loss '{name}' is defined twice (second time in {where})")
      merged[name] = fn
  return merged


# The shared losses, and those added at run time by `register_loss`.
LOSSES: dict[str, LossFn] = _merge(tuple((f.__name__, f.LOSSES) for f in _SHARED))


def available(method_losses: Mapping[str, LossFn] | None = None) -> dict[str, LossFn]:
  """The losses a run can name: the shared ones plus its method's (`Method.losses`)."""
  return _merge((("vlpre.losses", LOSSES), ("the method's losses", method_losses or {})))


def register_loss(name: str, fn: LossFn) -> None:
  """Adds a loss at run time (a notebook, a test); a method's own come with its descriptor."""
  if name in LOSSES and LOSSES[name] is not fn:
    raise ValueError(f"loss '{name}' is already registered")
  LOSSES[name] = fn


def build_loss(weights: dict[str, float],
               method_losses: Mapping[str, LossFn] | None = None, *, impl: str = "global",
               mesh: jax.sharding.Mesh | None = None) -> LossFn:
  """Σ_k w_k · loss_k over the shared losses and `method_losses`; each term's metrics are
  reported under '<name>/<metric>'. `impl` (LOSS_IMPLS): "local" runs the losses with a
  per-device form per device over `mesh`; "global": every loss on global arrays.

  The sum reduces per example (`reduction.count_of`) when every weighted term averages
  over examples, or when there is one term (its count is then the metric
  '<name>/<count>'); otherwise it is batch-coupled.
  """
  known = available(method_losses)
  unknown = set(weights) - set(known)
  if unknown:
    raise ValueError(f"unknown losses {sorted(unknown)}; known: {sorted(known)}")
  if not any(weights.values()):
    raise ValueError("config.losses is empty or all zero: give at least one loss a weight")
  if impl not in LOSS_IMPLS:
    raise ValueError(f"loss_impl {impl!r}: use one of {', '.join(LOSS_IMPLS)}")
  if impl == "local":
    if mesh is None:
      raise ValueError('loss_impl "local" needs the mesh the losses are laid out over')
    known.update(contrastive.local_losses(mesh))
  # Switched off (e.g. GPT4Image's CE-only baseline): a zero weight's inputs may be absent.
  active = {name: weight for name, weight in weights.items() if weight != 0}

  def total_loss(outputs, batch):
    total, metrics = 0.0, {}
    for name, weight in active.items():
      value, terms = known[name](outputs, batch)
      total = total + weight * value
      metrics[f"{name}/loss"] = value
      metrics.update({f"{name}/{k}": v for k, v in terms.items()})
    return total, metrics

  counts = {reduction.count_of(known[name]) for name in active}
  if counts == {reduction.EXAMPLES}:
    total_loss = reduction.per_example()(total_loss)
  elif len(active) == 1 and None not in counts:
    (name,), (count,) = active, counts
    total_loss = reduction.per_example(f"{name}/{count}")(total_loss)
  return total_loss
