"""Losses: pure functions with one signature, selected and weighted by a config dict.

    loss_fn(outputs: dict, batch: dict) -> (scalar loss, dict of scalar metrics)

`config.losses = {"clip": 1.0}` names them (name → weight); `build_loss` sums them.
Each family of losses is a file here whose `LOSSES` dict maps names to functions, listed
in `_FAMILIES` below: every loss is known as soon as `vlpre.losses` is imported, whatever
model the run uses. Fixed loss hyperparameters ride along in the model outputs (CLIP's
`logit_scale`, GPT4Image's `text_temperature`), so the config stays name → weight.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable

import jax

from vlpre.losses import classification
from vlpre.losses import contrastive
from vlpre.losses import language_modeling
from vlpre.losses import lcl
from vlpre.losses.classification import softmax_ce, text_byol, text_infonce, text_infonce_oneway
from vlpre.losses.contrastive import clip_loss, cosine_loss, info_nce, l2_normalize, siglip_loss
from vlpre.losses.language_modeling import lm_loss, next_token_cross_entropy

__all__ = [
    "LOSSES", "LossFn", "build_loss", "register_loss",
    "l2_normalize", "info_nce", "clip_loss", "siglip_loss", "cosine_loss",
    "softmax_ce", "text_infonce", "text_infonce_oneway", "text_byol",
    "lm_loss", "next_token_cross_entropy",
]

LossFn = Callable[[dict, dict], tuple[jax.Array, dict]]

# A new family of losses is a file with a `LOSSES` dict, added to this tuple.
_FAMILIES: tuple[ModuleType, ...] = (contrastive, classification, language_modeling, lcl)


def _merge(families: tuple[ModuleType, ...]) -> dict[str, LossFn]:
  """One name → loss dict; a name defined by two families is an error, not a silent override."""
  merged: dict[str, LossFn] = {}
  for family in families:
    for name, fn in family.LOSSES.items():
      if name in merged:
        raise ValueError(f"loss '{name}' is defined twice (second time in {family.__name__})")
      merged[name] = fn
  return merged


LOSSES: dict[str, LossFn] = _merge(_FAMILIES)


def register_loss(name: str, fn: LossFn) -> None:
  """Adds a loss at run time (a notebook, a test); the package's own are in `_FAMILIES`."""
  if name in LOSSES and LOSSES[name] is not fn:
    raise ValueError(f"loss '{name}' is already registered")
  LOSSES[name] = fn


def build_loss(weights: dict[str, float]) -> LossFn:
  """Σ_k w_k · loss_k; each term's metrics are reported under '<name>/<metric>'."""
  unknown = set(weights) - set(LOSSES)
  if unknown:
    raise ValueError(f"unknown losses {sorted(unknown)}; known: {sorted(LOSSES)}")
  if not any(weights.values()):
    raise ValueError("config.losses is empty or all zero: give at least one loss a weight")

  def total_loss(outputs, batch):
    total, metrics = 0.0, {}
    for name, weight in weights.items():
      if weight == 0:  # Switched off (e.g. GPT4Image's CE-only baseline): its inputs may be absent.
        continue
      value, terms = LOSSES[name](outputs, batch)
      total = total + weight * value
      metrics[f"{name}/loss"] = value
      metrics.update({f"{name}/{k}": v for k, v in terms.items()})
    return total, metrics

  return total_loss
