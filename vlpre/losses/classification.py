"""Classification losses: cross-entropy, and GPT4Image's text terms on image descriptions.

GPT4Image (arXiv 2306.00693) adds a text term to the classifier's cross-entropy:

    config.losses = {"softmax_ce": 1.0, "text_infonce": 0.3}

Fixed hyperparameters ride along in the model
outputs, as CLIP's `logit_scale` does, so `config.losses` stays a name → weight dict:
  outputs["text_temperature"]  the FIXED InfoNCE temperature (paper: 0.2 ResNet, 0.05 DeiT)
  outputs["label_smoothing"]   ε of the cross-entropy (0 when absent)

Shape letters: B batch, C classes, E text embedding dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlpre.losses import reduction
from vlpre.losses.contrastive import info_nce, l2_normalize


@reduction.per_example()
def softmax_ce(outputs, batch):
  """Cross-entropy of `logits` against the soft `targets` (mixup/cutmix) or one-hot labels."""
  logits_BxC = outputs["logits"].astype(jnp.float32)
  num_classes = logits_BxC.shape[-1]
  if "targets" in outputs:
    targets_BxC = outputs["targets"].astype(jnp.float32)
  else:
    targets_BxC = jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.float32)
  smoothing = outputs.get("label_smoothing", 0.0)
  targets_BxC = targets_BxC * (1.0 - smoothing) + smoothing / num_classes
  loss = optax.softmax_cross_entropy(logits_BxC, targets_BxC).mean()
  # Against the unmixed label: the one the image mostly shows.
  accuracy = jnp.mean(jnp.argmax(logits_BxC, axis=-1) == batch["label"])
  return loss, {"accuracy": accuracy}


def _text_pair(outputs, batch):
  if "zproj" not in outputs:
    raise ValueError("a GPT4Image text loss needs the model's `zproj`: build the classifier "
                     "with a text dim (config.text_loss_weight > 0)")
  if "txt_emb" not in batch:
    raise ValueError("a GPT4Image text loss needs `txt_emb` in the batch: the description "
                     "embeddings joined from the store (python -m vlpre.embed)")
  zimg_BxE = l2_normalize(outputs["zproj"].astype(jnp.float32))
  ztxt_BxE = l2_normalize(batch["txt_emb"].astype(jnp.float32))
  return zimg_BxE, ztxt_BxE


def _text_infonce(outputs, batch, *, symmetric: bool):
  zimg_BxE, ztxt_BxE = _text_pair(outputs, batch)
  # Under jit with the batch sharded, this spans the GLOBAL batch: negatives are gathered.
  logits_BxB = zimg_BxE @ ztxt_BxE.T / outputs["text_temperature"]
  loss, metrics = info_nce(logits_BxB, symmetric=symmetric)
  accuracy = jnp.mean(jnp.argmax(logits_BxB, axis=1) == jnp.arange(logits_BxB.shape[0]))
  return loss, {**metrics, "i2t_accuracy": accuracy}


def text_infonce(outputs, batch):
  """Symmetric InfoNCE between normalised `zproj` and `txt_emb`, fixed temperature."""
  return _text_infonce(outputs, batch, symmetric=True)


def text_infonce_oneway(outputs, batch):
  """The one-way variant: image → description only."""
  return _text_infonce(outputs, batch, symmetric=False)


@reduction.per_example()
def text_byol(outputs, batch):
  """BYOL-style variant: mean(2 − 2·cos(zproj, txt_emb)), positives only."""
  zimg_BxE, ztxt_BxE = _text_pair(outputs, batch)
  cos_B = jnp.sum(zimg_BxE * ztxt_BxE, axis=-1)
  return jnp.mean(2.0 - 2.0 * cos_B), {"cosine": jnp.mean(cos_B)}


LOSSES = {
    "softmax_ce": softmax_ce,
    "text_infonce": text_infonce,
    "text_infonce_oneway": text_infonce_oneway,
    "text_byol": text_byol,
}
