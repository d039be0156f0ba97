"""Vision Transformer image tower.

Shape letters: B batch, H/W patch grid, N image tokens (patches), D width, R blocks.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlpre.nn import layers

# width, depth, mlp_dim, heads (the ViT paper / big_vision presets).
PRESETS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


def decode_variant(variant: str) -> dict[str, Any]:
  """'B/16' → width/depth/mlp_dim/num_heads/patch_size keyword arguments."""
  name, patch = variant.split("/")
  width, depth, mlp_dim, heads = PRESETS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(patch))


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2D sin-cos position embedding (MoCo v3 / big_vision), shape [1, h*w, width]."""
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class ViT(nn.Module):
  """Patchify → (+pos, +cls) → (ln_pre) → encoder → pooled feature.

  The cls token gets no position: a position added to it would be a constant, which the
  learned token holds (a CLIP checkpoint's cls position is folded into it, vlpre.weights).

  `__call__` returns (pooled_BxD, tokens_BxNxD); `pool` is cls | mean | map (attention
  pooling with a learned query) | none (pooled is None). `encode` returns the same and
  the features of every level, for methods that read more than the last one.
  """
  width: int = 192
  depth: int = 12
  mlp_dim: int = 768
  num_heads: int = 3
  patch_size: int = 16
  pool: str = "mean"
  posemb: str = "learn"
  dropout: float = 0.0
  remat: bool = False
  scan: bool = True
  unroll: int | bool | None = None  # layers.Encoder: None = auto (full on CPU, 1 on GPU/TPU)
  attention: str = "auto"            # vlpre.nn.attention.IMPLEMENTATIONS
  pre_norm: bool = False             # a LayerNorm before the blocks (`ln_pre`: CLIP's towers)
  act: str = "gelu_tanh"             # the MLPs' activation (layers.ACTIVATIONS)
  norm_eps: float = layers.NORM_EPS  # every LayerNorm's epsilon (CLIP's towers: 1e-5)
  dtype: Any = jnp.float32

  def __call__(self, image_BxHxWx3, *, train: bool = False):
    out = self.encode(image_BxHxWx3, train=train, all_levels=False)
    return out["pooled"], out["tokens"]

  @nn.compact
  def encode(self, image_BxHxWx3, *, train: bool = False, all_levels: bool = True):
    """The tower's features by level. Only patch positions: the cls token is dropped.

    Returns a dict:
      pooled        [B, D], None when pool == "none" (what `__call__` returns first).
      tokens        [B, N, D] the last block's output after the final LayerNorm.
    and, when `all_levels` (the default; `__call__` skips them, they cost memory):
      patch_tokens  [B, N, D] the patch embeddings + position embeddings entering block 1.
      blocks        [R, B, N, D] every block's output, before the final LayerNorm
                    (blocks[-1] after it is `tokens`).
      patch_latents [B, N, D] only when pool == "map": the attention pool's per-patch
                    projections (layers.MapHead).
    """
    if self.pool not in ("cls", "mean", "map", "none"):
      raise ValueError(f"unknown pooling '{self.pool}'")
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID", dtype=self.dtype, name="patch_embed",
                kernel_init=layers.dense_init((None, None, "conv_in", "embed"),
                                              nn.initializers.lecun_normal()),
                bias_init=layers.dense_init(("embed",), nn.initializers.zeros))(
                    image_BxHxWx3.astype(self.dtype))
    batch, h, w, _ = x.shape
    x_BxNxD = x.reshape(batch, h * w, self.width)
    if self.posemb == "learn":
      pos_1xNxD = self.param("pos_embedding", layers.dense_init((None, "length", "embed"),
                                                                nn.initializers.normal(0.02)),
                             (1, h * w, self.width))
    elif self.posemb == "sincos2d":
      pos_1xNxD = jnp.asarray(sincos_2d(h, w, self.width))
    else:
      raise ValueError(f"unknown posemb '{self.posemb}'")
    x_BxNxD = x_BxNxD + pos_1xNxD.astype(self.dtype)
    patch_tokens_BxNxD = x_BxNxD
    num_prefix = 0
    if self.pool == "cls":
      cls_1x1xD = self.param("cls", layers.dense_init((None, None, "embed"), nn.initializers.zeros),
                             (1, 1, self.width))
      x_BxNxD = jnp.concatenate([jnp.tile(cls_1x1xD, (batch, 1, 1)).astype(self.dtype), x_BxNxD], 1)
      num_prefix = 1
    if self.pre_norm:
      x_BxNxD = layers.layer_norm(self.dtype, "ln_pre", self.norm_eps)(x_BxNxD)
    x_BxNxD = nn.Dropout(self.dropout)(x_BxNxD, deterministic=not train)
    encoded = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, dropout=self.dropout,
                             remat=self.remat, scan=self.scan, return_all_blocks=all_levels,
                             unroll=self.unroll, attention=self.attention, act=self.act,
                             norm_eps=self.norm_eps, dtype=self.dtype, name="encoder")(
                                 x_BxNxD, train=train)
    x_BxNxD, blocks_RxBxNxD = encoded if all_levels else (encoded, None)
    out = {"tokens": x_BxNxD[:, num_prefix:]}
    if all_levels:
      out["patch_tokens"] = patch_tokens_BxNxD
      out["blocks"] = blocks_RxBxNxD[:, :, num_prefix:]
    if self.pool == "cls":
      out["pooled"] = x_BxNxD[:, 0]
    elif self.pool == "mean":
      out["pooled"] = x_BxNxD.mean(axis=1)
    elif self.pool == "map":
      map_head = layers.MapHead(self.num_heads, self.mlp_dim, self.dtype, self.attention,
                                act=self.act, norm_eps=self.norm_eps, name="map_head")
      if all_levels:
        out["pooled"], out["patch_latents"] = map_head(x_BxNxD, return_patch_latents=True)
      else:
        out["pooled"] = map_head(x_BxNxD)
    else:
      out["pooled"] = None
    return out


def vit_from_config(image: dict[str, Any], dtype, name="img") -> ViT:
  kwargs = dict(image)
  if "variant" in kwargs:
    kwargs = {**decode_variant(kwargs.pop("variant")), **kwargs}
  return ViT(dtype=dtype, name=name, **kwargs)
