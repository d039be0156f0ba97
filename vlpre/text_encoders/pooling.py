"""Sequence pooling and the Linen module a trainer embeds: backbone + pooling + L2 norm."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from vlpre.losses import l2_normalize

# "last": state of the last real token (decoder embedders: E5-Mistral, Qwen3-Embedding, the
#   LIFT ablations); "eos": state of the last EOS among real tokens; "mean": masked mean
#   (sentence-transformers); "cls": first token (BERT [CLS]).
POOLING_KINDS = ("last", "eos", "mean", "cls")


def _last_true_index(flags_BxL: jax.Array) -> jax.Array:
  """Index of the last True per row (L-1 if none); works for any padding side."""
  seq_len = flags_BxL.shape[1]
  return seq_len - 1 - jnp.argmax(flags_BxL[:, ::-1], axis=1)


def pool_hidden_states(hidden_BxLxD: jax.Array, input_ids_BxL: jax.Array,
                       attention_mask_BxL: jax.Array, kind: str,
                       eos_id: int | None = None) -> jax.Array:
  """Pools token states into one float32 vector per row.

  Args:
    hidden_BxLxD: token states.
    input_ids_BxL: token ids (used by "eos").
    attention_mask_BxL: 1 for real tokens.
    kind: one of POOLING_KINDS.
    eos_id: the EOS id for "eos" pooling. Pad and EOS ids may coincide (SmolLM2), so only
      EOS tokens under the mask count; a row without one falls back to its last real token.

  Returns:
    float32 [B, D].
  """
  hidden_BxLxD = hidden_BxLxD.astype(jnp.float32)
  valid_BxL = attention_mask_BxL.astype(bool)
  if kind == "mean":
    weights_BxLx1 = valid_BxL[..., None].astype(jnp.float32)
    # Clamp as sentence-transformers does, so an all-padding row gives 0, not NaN.
    count_Bx1 = jnp.maximum(weights_BxLx1.sum(axis=1), 1e-9)
    return (hidden_BxLxD * weights_BxLx1).sum(axis=1) / count_Bx1
  if kind == "cls":
    return hidden_BxLxD[:, 0]
  if kind == "last":
    index_B = _last_true_index(valid_BxL)
  elif kind == "eos":
    if eos_id is None:
      raise ValueError("eos pooling needs eos_id")
    is_eos_BxL = valid_BxL & (input_ids_BxL == eos_id)
    index_B = jnp.where(is_eos_BxL.any(axis=1), _last_true_index(is_eos_BxL),
                        _last_true_index(valid_BxL))
  else:
    raise ValueError(f"pooling {kind!r} not in {POOLING_KINDS}")
  return jnp.take_along_axis(hidden_BxLxD, index_B[:, None, None], axis=1)[:, 0]


class PooledTextEncoder(nn.Module):
  """`(input_ids_BxL, attention_mask_BxL) -> embedding_BxD` (float32).

  Its parameters are `{"backbone": <HF-named tree>}`. Used as a submodule of a larger
  model, those weights can be passed in frozen: gradients are only taken with respect to
  what the loss is differentiated by, so a frozen encoder costs a forward pass only.

  Attributes:
    backbone: module mapping (ids, mask) to hidden states [B, L, D] (vlpre's Decoder,
      whose DecoderOutput carries them as `.hidden`, or BERT).
    pooling: one of POOLING_KINDS.
    normalize: L2-normalise the pooled vector.
    eos_id: EOS id for "eos" pooling.
  """
  backbone: nn.Module
  pooling: str
  normalize: bool = True
  eos_id: int | None = None

  def hidden_states(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
    """The backbone's hidden states [B, L, D] (for checks and token-level uses)."""
    out = self.backbone(input_ids_BxL, attention_mask_BxL)
    return getattr(out, "hidden", out)

  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
    hidden_BxLxD = self.hidden_states(input_ids_BxL, attention_mask_BxL)
    embedding_BxD = pool_hidden_states(hidden_BxLxD, input_ids_BxL, attention_mask_BxL,
                                       self.pooling, self.eos_id)
    return l2_normalize(embedding_BxD) if self.normalize else embedding_BxD
