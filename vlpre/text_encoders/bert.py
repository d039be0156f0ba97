"""BERT encoders through transformers' Flax BERT (its Linen module, not the model wrapper).

Imported only when a BERT model is loaded: transformers' Flax modelling import is slow.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from transformers.models.bert.modeling_flax_bert import FlaxBertModule


class BertBackbone(FlaxBertModule):
  """FlaxBertModule with the `(ids, mask) -> hidden_BxLxD` call the pooling wrapper expects.

  Construct with `add_pooling_layer=False`: sentence embedders pool the token states
  themselves and the [CLS] pooler weights go unused. Parameters keep transformers' Flax
  names (`embeddings/...`, `encoder/layer/N/...`).
  """

  def __call__(self, input_ids_BxL: jax.Array,  # pytype: disable=signature-mismatch
               attention_mask_BxL: jax.Array) -> jax.Array:
    # A single segment and absolute positions 0..L-1, as FlaxBertModel's wrapper fills in.
    position_ids_BxL = jnp.broadcast_to(jnp.arange(input_ids_BxL.shape[1]), input_ids_BxL.shape)
    outputs = super().__call__(
        input_ids_BxL, attention_mask_BxL, token_type_ids=jnp.zeros_like(input_ids_BxL),
        position_ids=position_ids_BxL, deterministic=True, return_dict=True)
    return outputs.last_hidden_state
