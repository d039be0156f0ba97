"""Image tower + trainable text tower with linear heads: CLIP, SigLIP and LiT."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlpre.nn import layers
from vlpre.nn.text import TextTransformer
from vlpre.nn.vit import vit_from_config


class Model(nn.Module):
  """Two towers mapping images and texts into one `embed_dim` space.

  Outputs `zimg`, `ztxt` (unnormalised) and the loss's learnable scalars: `logit_scale`
  (exp of t', clipped at `max_logit_scale`) and `logit_bias` (SigLIP's b; zero otherwise).
  """
  image: dict[str, Any]
  text: dict[str, Any]
  embed_dim: int = 256
  logit_scale_init: float = float(np.log(1 / 0.07))
  max_logit_scale: float = 100.0
  logit_bias_init: float | None = None
  # False: zimg is the pooled feature itself (SigLIP's public towers: big_vision's
  # out_dim=(None, E)); embed_dim must then equal the image width.
  image_head: bool = True
  image_head_bias: bool = False  # the image head adds a bias (big_vision's LiT towers)
  text_head_bias: bool = False   # the text head adds a bias (SigLIP's and LiT's public towers)
  dtype: Any = jnp.float32

  def setup(self):
    self.img = vit_from_config(self.image, self.dtype)
    if self.image_head:
      self.img_head = nn.Dense(self.embed_dim, use_bias=self.image_head_bias, dtype=self.dtype,
                               kernel_init=layers.dense_init(("embed", None)),
                               bias_init=layers.dense_init((None,), nn.initializers.zeros))
    self.txt = TextTransformer(dtype=self.dtype, **self.text)
    self.txt_head = nn.Dense(self.embed_dim, use_bias=self.text_head_bias, dtype=self.dtype,
                             kernel_init=layers.dense_init(("embed", None)),
                             bias_init=layers.dense_init((None,), nn.initializers.zeros))
    self.t_prime = self.param("t_prime", nn.initializers.constant(self.logit_scale_init), ())
    if self.logit_bias_init is not None:
      self.bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), ())

  def embed_image(self, image, train: bool = False):
    pooled_BxD, _ = self.img(image, train=train)
    if not self.image_head and pooled_BxD.shape[-1] != self.embed_dim:
      raise ValueError(f"image_head=False: the image width {pooled_BxD.shape[-1]} must equal "
                       f"embed_dim {self.embed_dim}")
    zimg_BxE = self.img_head(pooled_BxD) if self.image_head else pooled_BxD
    return {"zimg": zimg_BxE.astype(jnp.float32),
            "pre_logits": pooled_BxD.astype(jnp.float32)}

  def embed_patches(self, image):
    """The image tower's final per-patch tokens [B, N, D] (cls dropped), for attentive probes."""
    return self.img.encode(image, all_levels=False)["tokens"].astype(jnp.float32)

  def embed_text(self, text, text_mask=None, train: bool = False):
    return self.txt_head(self.txt(text, text_mask, train=train)).astype(jnp.float32)

  def __call__(self, batch, *, train: bool = False):
    out = self.embed_image(batch["image"], train=train)
    out["ztxt"] = self.embed_text(batch["text"], batch.get("text_mask"), train=train)
    out["logit_scale"] = jnp.exp(jnp.minimum(self.t_prime, jnp.log(self.max_logit_scale)))
    out["logit_bias"] = self.bias if self.logit_bias_init is not None else jnp.zeros(())
    return out
