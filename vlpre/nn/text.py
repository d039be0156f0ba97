"""Trainable text transformer (the CLIP text tower)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlpre.nn import layers


class TextTransformer(nn.Module):
  """Token + position embeddings → causal encoder → feature at the end-of-text token.

  The end-of-text token is the last non-padding position of each row (`text_mask`), so
  any tokenizer that appends an EOS works, not only CLIP's (where it is the argmax id).
  `pool="final"` reads the row's final position instead, padding included, and attention
  then sees the padding too: the text tower of SigLIP (big_vision's `pool_type="last"`),
  trained on rows padded to a fixed length.
  """
  vocab_size: int = 49_408
  max_len: int = 77
  width: int = 192
  depth: int = 12
  mlp_dim: int = 768
  num_heads: int = 3
  causal: bool = True
  pool: str = "last"  # last | mean | final
  dropout: float = 0.0
  remat: bool = False
  scan: bool = True
  unroll: int | bool | None = None  # layers.Encoder: None = auto (full on CPU, 1 on GPU/TPU)
  attention: str = "auto"            # vlpre.nn.attention.IMPLEMENTATIONS
  act: str = "gelu_tanh"             # the MLPs' activation (layers.ACTIVATIONS)
  norm_eps: float = layers.NORM_EPS  # every LayerNorm's epsilon (CLIP's towers: 1e-5)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, text_BxL, text_mask_BxL=None, *, train: bool = False):
    if text_BxL.shape[1] > self.max_len:
      raise ValueError(f"text length {text_BxL.shape[1]} > max_len {self.max_len}")
    if text_mask_BxL is None:
      text_mask_BxL = (text_BxL != 0).astype(jnp.int32)
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embed",
                     embedding_init=layers.dense_init(("vocab", "embed"), nn.initializers.normal(0.02)))
    pos_1xLxD = self.param("pos_embedding", layers.dense_init((None, "length", "embed"),
                                                              nn.initializers.normal(0.01)),
                           (1, self.max_len, self.width))
    length = text_BxL.shape[1]
    x_BxLxD = embed(text_BxL) + pos_1xLxD[:, :length].astype(self.dtype)
    # Causal attention needs no padding mask: padding sits after the EOS we read out.
    mask = None if self.causal or self.pool == "final" else text_mask_BxL
    x_BxLxD = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, causal=self.causal,
                             dropout=self.dropout, remat=self.remat, scan=self.scan,
                             unroll=self.unroll, attention=self.attention, act=self.act,
                             norm_eps=self.norm_eps, dtype=self.dtype, name="encoder")(
                                 x_BxLxD, mask, train=train)
    if self.pool == "last":
      last_B = jnp.maximum(text_mask_BxL.sum(axis=1) - 1, 0)
      return x_BxLxD[jnp.arange(x_BxLxD.shape[0]), last_B]
    if self.pool == "mean":
      m = text_mask_BxL[..., None].astype(x_BxLxD.dtype)
      return (x_BxLxD * m).sum(1) / jnp.maximum(m.sum(1), 1)
    if self.pool == "final":
      return x_BxLxD[:, -1]
    raise ValueError(f"unknown text pooling '{self.pool}'")
