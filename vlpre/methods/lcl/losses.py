"""LCL's two losses (Latent Compression Learning, arXiv 2406.07543; METHODS.md § LCL).

The model's causal transformer reads interleaved documents: text tokens, and for each
image `<soi>` + its visual tokens + `<eoi>`. LCL's objective L = λ·L_con + L_gen
(λ = 0.1 in the paper, a weight in `config.losses`) splits into:

  lcl_contrastive  L_con: the causal model's output at each image's `<soi>` (everything
                   before the image, summarised) against that image's pooled latent.
  lcl_generation   L_gen: next-token cross-entropy on text targets only.

Model outputs they read:
  soi_embedding_BxMxE  the causal output at each slot's `<soi>` → final norm → projection
                       (not normalised here: the loss normalises).
  image_latent_BxMxE   each image slot's pooled latent (the attention pool's output).
  image_valid_BxM      True where the slot holds an image AND its `<soi>` is not the first
                       token of its document / packed segment (nothing precedes it).
  logit_scale          the inverse temperature, already exp(t') and clipped, as CLIP's
                       model returns it (vlpre/methods/two_tower/model.py): logits are its
                       multiple of the cosine.
  logits_BxLxV         the causal model's logits at every input position.
and batch fields: tokens [B, L], target_mask [B, L] (1 where the NEXT token is a text
token to predict; image placeholders, `<eoi>` and padding are 0, as is every position
whose next token starts another packed document).

Under jit with the batch sharded over the data axes, these are global arrays: negatives
come from every device's images and the means run over the global batch, however the
valid slots are spread over devices (XLA gathers).

Shape letters: B rows, M image slots per row, I = B·M slots of the global batch, E
embedding dim, L positions, V vocabulary.
"""
from __future__ import annotations

import jax.numpy as jnp

from vlpre.losses import reduction
from vlpre.losses.contrastive import info_nce, l2_normalize
from vlpre.losses.language_modeling import next_token_cross_entropy

# Logit of an invalid pair: exp() of it is exactly 0 in float32, and unlike -inf it keeps
# softmax and its gradient free of NaNs.
_MASKED_LOGIT = -1e9


def lcl_contrastive(outputs, batch):
  """Symmetric InfoNCE between valid `<soi>` outputs and the images that follow them.

  Every valid image is the positive of its own `<soi>`; every other valid image of the
  global batch is a negative (both directions). Invalid slots are masked out of rows and
  columns. The mean runs over valid slots only; with none, the loss is 0. Metrics:
  `accuracy`, the share of valid `<soi>` whose own image scores highest among the valid
  images; `num_valid_images`.
  """
  del batch
  width = outputs["soi_embedding_BxMxE"].shape[-1]
  soi_IxE = l2_normalize(outputs["soi_embedding_BxMxE"].astype(jnp.float32).reshape(-1, width))
  image_IxE = l2_normalize(outputs["image_latent_BxMxE"].astype(jnp.float32).reshape(-1, width))
  valid_I = outputs["image_valid_BxM"].reshape(-1).astype(bool)
  num_slots = valid_I.shape[0]
  num_valid = jnp.sum(valid_I.astype(jnp.float32))

  logits_IxI = outputs["logit_scale"] * soi_IxE @ image_IxE.T  # rows <soi>, columns images
  pair_valid_IxI = valid_I[:, None] & valid_I[None, :]
  # An invalid slot keeps only its own diagonal entry, at 0: its row and column then cost
  # exactly 0, and no valid row or column sees it. info_nce's mean over all I slots,
  # rescaled by I / num_valid, is then the mean over the valid ones.
  diagonal_IxI = jnp.eye(num_slots, dtype=bool)
  logits_IxI = jnp.where(pair_valid_IxI, logits_IxI,
                         jnp.where(diagonal_IxI, 0.0, _MASKED_LOGIT))
  loss, _ = info_nce(logits_IxI)
  loss = loss * num_slots / jnp.maximum(num_valid, 1.0)

  own_image_I = jnp.argmax(logits_IxI, axis=1) == jnp.arange(num_slots)
  accuracy = jnp.sum(own_image_I & valid_I) / jnp.maximum(num_valid, 1.0)
  return loss, {"accuracy": accuracy, "num_valid_images": num_valid,
                "logit_scale": outputs["logit_scale"]}


@reduction.per_example("num_tokens")
def lcl_generation(outputs, batch):
  """Next-token cross-entropy where `target_mask` marks a text token as the next one.

  Position t predicts tokens[t + 1]; the last position has no next token and is dropped.
  """
  return next_token_cross_entropy(outputs["logits_BxLxV"][:, :-1], batch["tokens"][:, 1:],
                                  batch["target_mask"][:, :-1])


LOSSES = {
    "lcl_contrastive": lcl_contrastive,
    "lcl_generation": lcl_generation,
}
