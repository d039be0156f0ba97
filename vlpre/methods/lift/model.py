"""LIFT: only the image tower trains; a frozen LLM embedder gives the text targets.

Image tower → average pool over patch tokens → Linear → GELU → Linear into the text
embedding dimension. Text embeddings come either from the frozen encoder running in the
same jitted step (`text_mode="online"`, batch has `text`/`text_mask`) or from a keyed
cache joined to the batch by the input pipeline (`text_mode="cached"`, batch has
`txt_emb`); both give the same loss on the same batch.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlpre import losses
from vlpre import methods
from vlpre.data import text_batching
from vlpre.text_encoders import store as store_lib
from vlpre.nn import layers
from vlpre.nn.vit import vit_from_config


class Model(nn.Module):
  image: dict[str, Any]
  text_dim: int
  txt_encoder: nn.Module | None = None  # frozen: its params are matched by config.frozen
  head_hidden: int | None = None        # default: text_dim (the paper's 768→4096→4096)
  text_max_len: int = 77
  center_text: bool = False             # subtract the caption store's mean, renormalise
  logit_scale_init: float = float(np.log(1 / 0.07))
  max_logit_scale: float = 100.0
  dtype: Any = jnp.float32

  def setup(self):
    self.img = vit_from_config({**self.image, "pool": "mean"}, self.dtype)
    hidden = self.head_hidden or self.text_dim
    self.head_in = nn.Dense(hidden, dtype=self.dtype, kernel_init=layers.dense_init(("embed", "mlp")),
                            bias_init=layers.dense_init(("mlp",), nn.initializers.zeros))
    self.head_out = nn.Dense(self.text_dim, dtype=self.dtype,
                             kernel_init=layers.dense_init(("mlp", "embed")),
                             bias_init=nn.initializers.zeros)
    self.t_prime = self.param("t_prime", nn.initializers.constant(self.logit_scale_init), ())
    # Frozen (config.frozen); build() fills it from the embedding store when centring. It
    # exists either way, so one freeze list fits both settings.
    self.txt_mean = self.param("txt_mean", nn.initializers.zeros, (self.text_dim,))

  def _center(self, ztxt_BxE):
    """Mean-centring of a fixed text embedding: removes the direction every caption
    shares (a plain decoder's embeddings are highly anisotropic), identical for cached
    targets and for prompts embedded online by the evaluators."""
    if not self.center_text:
      return ztxt_BxE
    return losses.l2_normalize(ztxt_BxE - self.txt_mean)

  def embed_image(self, image, train: bool = False):
    pooled_BxD, _ = self.img(image, train=train)
    z_BxE = self.head_out(nn.gelu(self.head_in(pooled_BxD)))
    return {"zimg": z_BxE.astype(jnp.float32), "pre_logits": pooled_BxD.astype(jnp.float32)}

  def embed_patches(self, image):
    """The image tower's final per-patch tokens [B, N, D], for attentive probes."""
    return self.img.encode(image, all_levels=False)["tokens"].astype(jnp.float32)

  def embed_text(self, text, text_mask=None, train: bool = False):
    del train  # frozen
    if self.txt_encoder is None:
      raise ValueError("this LIFT model was built without a text encoder")
    if text_mask is None:
      text_mask = jnp.ones_like(text)
    return self._center(self.txt_encoder(text, text_mask).astype(jnp.float32))

  def __call__(self, batch, *, train: bool = False):
    out = self.embed_image(batch["image"], train=train)
    if "txt_emb" in batch:
      out["ztxt"] = self._center(batch["txt_emb"].astype(jnp.float32))
      if self.is_initializing() and self.txt_encoder is not None:
        # Create the encoder's parameters even in cached mode: evaluators embed prompts.
        dummy = jnp.zeros((1, self.text_max_len), jnp.int32)
        self.embed_text(dummy, jnp.ones_like(dummy))
    else:
      out["ztxt"] = self.embed_text(batch["text"], batch.get("text_mask"))
    out["logit_scale"] = jnp.exp(jnp.minimum(self.t_prime, jnp.log(self.max_logit_scale)))
    return out


def input_extras(config) -> methods.InputExtras:
  """Cached mode joins each sample's caption embedding from the store by key.

  Online mode trims each batch's token padding to a length bucket (the frozen LLM runs
  over the longest caption's bucket, not max_len; the embeddings are the same), unless
  `config.text_encoder.trim_padding` is False; `text_encoder.length_buckets` overrides
  the default buckets (vlpre.data.text_batching.length_buckets).
  """
  if config.text_mode == "online":
    if not config.text_encoder.get("trim_padding", True):
      return methods.InputExtras()
    buckets = config.text_encoder.get("length_buckets") or None
    return methods.InputExtras(batch_transform=text_batching.TrimTextPadding(
        tuple(buckets) if buckets else None))
  if config.text_mode != "cached":
    raise ValueError(f"text_mode must be 'online' or 'cached', got '{config.text_mode}'")
  store = store_lib.EmbeddingStore(store_lib.cache_dir(config), store_lib.encoder_settings(config))
  return methods.InputExtras(transforms=(store_lib.LookupEmbedding(store),), keys=("txt_emb",),
                            tokenize=False)


def reads_embedding_store(config) -> bool:
  """Cached mode joins the store's embeddings; centring reads its mean in either mode."""
  return config.text_mode == "cached" or bool(config.text_encoder.get("center", False))


def build(config) -> methods.Built:
  encoder = store_lib.text_encoder(config)
  center = bool(config.text_encoder.get("center", False))
  model = Model(txt_encoder=encoder.module, text_dim=encoder.dim,
                text_max_len=config.text_encoder.max_len, center_text=center,
                dtype=jnp.dtype(config.get("dtype", "float32")), **config.model)
  pretrained = {"txt_encoder": encoder.params}
  if center:  # the mean of the training captions' embeddings, from the store.
    store = store_lib.EmbeddingStore(store_lib.cache_dir(config),
                                     store_lib.encoder_settings(config))
    pretrained["txt_mean"] = store.mean()
  # vlpre's decoder names its weights' axes itself; BERT's come from regex rules.
  return methods.Built(model, pretrained=pretrained,
                      logical_axes={"txt_encoder": encoder.logical_axes()})


def build_tokenizer(config):
  return store_lib.text_encoder(config).tokenizer
