"""Language-modelling losses: next-token cross-entropy on masked targets.

The model decides what is predicted (captions only, text but not image placeholders, ...)
and returns it aligned, so the loss does no shifting of its own:
  outputs["lm_logits"]   [B, L, V] logits at each input position
  outputs["lm_targets"]  [B, L] the token each position should predict (the next one)
  outputs["lm_weights"]  [B, L] 1 where a target counts, 0 elsewhere (padding, prompts)
Under jit with the batch sharded, the sums run over the GLOBAL batch, so every target
token weighs the same whatever device holds it.

Shape letters: B batch, L positions, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlpre.losses import reduction


def next_token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                             weights_BxL: jax.Array) -> tuple[jax.Array, dict]:
  """Mean −log p(target) over weighted positions, with accuracy and token count."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  weights_BxL = weights_BxL.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None].astype(jnp.int32),
                                         axis=-1)[..., 0]
  nll_BxL = log_z_BxL - target_logit_BxL
  num_tokens = jnp.sum(weights_BxL)
  denominator = jnp.maximum(num_tokens, 1.0)
  loss = jnp.sum(nll_BxL * weights_BxL) / denominator
  correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
  accuracy = jnp.sum(correct_BxL * weights_BxL) / denominator
  return loss, {"accuracy": accuracy, "num_tokens": num_tokens, "perplexity": jnp.exp(loss)}


@reduction.per_example("num_tokens")
def lm_loss(outputs, batch):
  """Next-token cross-entropy of the model's aligned logits/targets/weights."""
  del batch
  return next_token_cross_entropy(outputs["lm_logits"], outputs["lm_targets"],
                                  outputs["lm_weights"])


LOSSES = {"lm": lm_loss}
