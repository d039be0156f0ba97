"""Image–text losses on a pair of embeddings: CLIP, SigLIP, LIFT's cosine.

`outputs` is what the model returned for the GLOBAL batch: under jit with the batch
sharded over the data axes, `zimg @ ztxt.T` spans every device's samples, so negatives
come from the whole global batch (XLA inserts the all-gathers).

Shape letters: B batch, E embedding dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(‖x‖, eps), like torch.nn.functional.normalize: the package's one l2-normalise.

  Written as x·rsqrt(max(‖x‖², eps²)), the same value, so that a zero vector has a finite
  gradient (the gradient of ‖x‖ = sqrt(Σx²) is infinite at 0). The sum of squares is taken
  in float32 whatever x's dtype: eps² underflows in float16, and bf16 sums lose digits.
  """
  sum_sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return (x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))).astype(x.dtype)


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
  zimg_BxE = l2_normalize(outputs["zimg"].astype(jnp.float32))
  ztxt_BxE = l2_normalize(outputs["ztxt"].astype(jnp.float32))
  cos_B = jnp.sum(zimg_BxE * ztxt_BxE, axis=-1)
  return jnp.mean(1.0 - cos_B), {"cosine": jnp.mean(cos_B)}


LOSSES = {
    "clip": clip_loss,
    "siglip": siglip_loss,
    "cosine": cosine_loss,
}
