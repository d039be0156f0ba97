"""The text embedder's loss: InfoNCE over caption pairs, in-batch and hard negatives.

Shape letters: B pairs in the (global) batch, E embedding dim, N hard negatives per pair.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from vlpre.losses import info_nce


def pair_infonce(outputs, batch):
  """Symmetric InfoNCE between anchors and positives, fixed temperature (SimCSE / E5).

  anchor → candidates: its positive among every positive of the batch (the others are
  in-batch negatives) and every hard negative of the batch (N per pair: each anchor's
  own and the other pairs'); positive → anchors: its anchor among the batch's anchors.
  The two directions are averaged. Under jit with the batch sharded the candidates span
  the global batch.
  """
  del batch
  scale = outputs["logit_scale"]
  z_anchor_BxE = outputs["z_anchor"].astype(jnp.float32)
  z_positive_BxE = outputs["z_positive"].astype(jnp.float32)
  z_negative_BxNxE = outputs["z_negative"].astype(jnp.float32)
  rows, dim = z_anchor_BxE.shape
  candidates_CxE = jnp.concatenate([z_positive_BxE, z_negative_BxNxE.reshape(-1, dim)])
  logits_BxC = scale * z_anchor_BxE @ candidates_CxE.T
  labels_B = jnp.arange(rows)
  forward = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()
  backward, _ = info_nce(scale * z_positive_BxE @ z_anchor_BxE.T, symmetric=False)
  accuracy = jnp.mean(jnp.argmax(logits_BxC, axis=1) == labels_B)
  positive_cos = jnp.mean(jnp.sum(z_anchor_BxE * z_positive_BxE, axis=-1))
  return 0.5 * (forward + backward), {"anchor_loss": forward, "positive_loss": backward,
                                      "pair_accuracy": accuracy, "positive_cosine": positive_cos}


LOSSES = {"pair_infonce": pair_infonce}
