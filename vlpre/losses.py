"""Losses: pure functions with one signature, selected and weighted by a config dict.

    loss_fn(outputs: dict, batch: dict) -> (scalar loss, dict of scalar metrics)

`outputs` is what the model returned for the GLOBAL batch: under jit with the batch
sharded over the data axes, `zimg @ ztxt.T` spans every device's samples, so negatives
come from the whole global batch (XLA inserts the all-gathers).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[dict, dict], tuple[jax.Array, dict]]


def l2_normalize(x, axis=-1, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps * eps))


def _pairwise_logits(outputs):
  zimg_BxE = l2_normalize(outputs["zimg"].astype(jnp.float32))
  ztxt_BxE = l2_normalize(outputs["ztxt"].astype(jnp.float32))
  return zimg_BxE @ ztxt_BxE.T


def info_nce(logits_BxB, *, symmetric: bool = True):
  """Cross-entropy with the diagonal as targets; averaged over both directions if symmetric."""
  labels_B = jnp.arange(logits_BxB.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits_BxB, labels_B).mean()
  if not symmetric:
    return i2t, {"i2t_loss": i2t}
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits_BxB.T, labels_B).mean()
  return 0.5 * (i2t + t2i), {"i2t_loss": i2t, "t2i_loss": t2i}


def clip_loss(outputs, batch):
  """CLIP: symmetric InfoNCE on L2-normalised embeddings with a learnable temperature."""
  del batch
  logits_BxB = outputs["logit_scale"] * _pairwise_logits(outputs)
  loss, metrics = info_nce(logits_BxB)
  accuracy = jnp.mean(jnp.argmax(logits_BxB, axis=1) == jnp.arange(logits_BxB.shape[0]))
  return loss, {**metrics, "i2t_accuracy": accuracy, "logit_scale": outputs["logit_scale"]}


def siglip_loss(outputs, batch):
  """SigLIP: −1/B Σ_i Σ_j log σ(z_ij (t·⟨x_i, y_j⟩ + b)), z = +1 on the diagonal, −1 off it."""
  del batch
  logits_BxB = outputs["logit_scale"] * _pairwise_logits(outputs) + outputs["logit_bias"]
  z_BxB = 2.0 * jnp.eye(logits_BxB.shape[0]) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(z_BxB * logits_BxB)) / logits_BxB.shape[0]
  return loss, {"logit_scale": outputs["logit_scale"], "logit_bias": outputs["logit_bias"]}


def cosine_loss(outputs, batch):
  """LIFT's `simplistic_cos`: mean(1 − cos(z_img, z_txt)), positives only, no temperature."""
  del batch
  zimg = l2_normalize(outputs["zimg"].astype(jnp.float32))
  ztxt = l2_normalize(outputs["ztxt"].astype(jnp.float32))
  cos_B = jnp.sum(zimg * ztxt, axis=-1)
  return jnp.mean(1.0 - cos_B), {"cosine": jnp.mean(cos_B)}


LOSSES: dict[str, LossFn] = {
    "clip": clip_loss,
    "siglip": siglip_loss,
    "cosine": cosine_loss,
}


def register_loss(name: str, fn: LossFn) -> None:
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
