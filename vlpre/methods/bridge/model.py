"""Bridge training: pretrained LLM blocks as a vision backbone (arXiv 2604.01833).

image → conv patch embedding into the LLM width → the decoder's transformer blocks
(vlpre.llm, fed through input embeddings; causal as pretrained, or bidirectional) →
last-token or mean pooling → linear classifier. Weights of the blocks come from a real
checkpoint (the packaged SmolLM2 by default); `config.bridge.pretrained = False` builds
the same architecture from random init.

Random-label bridge training: `RandomLabels` reassigns a share of the labels to a
different class (ratio 1.0: every one), or draws a class per image where the data has
no labels; the draw is a hash of (seed, sample key), so it is deterministic per seed and
identical across resume. Partial bridging freezes LLM blocks through the trainer's
regexes on the decoder's layer groups (e.g. `bridge.llm.layer_groups = (2, 2)` and
`frozen = ("llm/layers_2to3/.*",)` keeps the last two blocks as pretrained).

Outputs: `logits` [B, C] (the softmax_ce loss), `feature` [B, D]; `embed_image` serves
the linear probe, `classify` the classification evaluator.

Shape letters: B batch, H/W image, N patches, D LLM width, C classes.
"""
from __future__ import annotations

import hashlib
from typing import Any

import flax.linen as nn
import grain
import jax.numpy as jnp
import numpy as np

from vlpre import llm as llm_lib
from vlpre import methods
from vlpre.data import transforms
from vlpre.nn import layers


class Model(nn.Module):
  """Patches → LLM blocks → pooled → linear head.

  Attributes:
    llm: the decoder (its `causal` flag decides the attention; no token embedding used).
    num_classes: C.
    patch_size: square conv patches (stride = size).
    pooling: "last" (the paper: last token) or "mean".
  """
  llm: llm_lib.Decoder
  num_classes: int
  patch_size: int = 4
  pooling: str = "last"
  dtype: Any = jnp.float32

  def setup(self):
    width = self.llm.config.hidden_size
    self.patch_embed = nn.Conv(
        width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
        dtype=self.dtype, kernel_init=layers.dense_init((None, None, "conv_in", "embed"),
                                                        nn.initializers.lecun_normal()),
        bias_init=layers.dense_init(("embed",), nn.initializers.zeros))
    self.head = nn.Dense(self.num_classes, dtype=self.dtype,
                         kernel_init=layers.dense_init(("embed", "classes"), nn.initializers.zeros),
                         bias_init=layers.dense_init(("classes",), nn.initializers.zeros))

  def _feature(self, image_BxHxWx3, train: bool = False):
    if self.pooling not in ("last", "mean"):
      raise ValueError(f"bridge pooling must be 'last' or 'mean', got {self.pooling!r}")
    x = self.patch_embed(image_BxHxWx3.astype(self.dtype))
    x_BxNxD = x.reshape(x.shape[0], -1, x.shape[-1])
    hidden_BxNxD = self.llm(embeddings_BxLxD=x_BxNxD, deterministic=not train).hidden
    pooled_BxD = hidden_BxNxD[:, -1] if self.pooling == "last" else hidden_BxNxD.mean(axis=1)
    return nn.with_logical_constraint(pooled_BxD, ("batch", "act_embed"))

  def embed_image(self, image, train: bool = False):
    del train
    feature_BxD = self._feature(image).astype(jnp.float32)
    return {"zimg": feature_BxD, "pre_logits": feature_BxD}

  def classify(self, image):
    return self.head(self._feature(image)).astype(jnp.float32)

  def __call__(self, batch, *, train: bool = False):
    feature_BxD = self._feature(batch["image"], train)  # drop-path in the blocks when training
    return {"logits": self.head(feature_BxD).astype(jnp.float32),
            "feature": feature_BxD.astype(jnp.float32)}


def random_label(key: str, label: int | None, *, ratio: float, num_classes: int,
                 seed: int) -> int:
  """The bridge-training label of one sample: a pure function of (seed, key, label).

  With a label: kept with probability 1 − ratio, else replaced by one of the OTHER
  classes, uniformly. Without one (unlabelled images): a uniform class.
  """
  digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
  u = int.from_bytes(digest[:8], "little") / 2**64  # uniform in [0, 1)
  draw = int.from_bytes(digest[8:16], "little")
  if label is None:
    return draw % num_classes
  if u >= ratio:
    return int(label)
  return (int(label) + 1 + draw % (num_classes - 1)) % num_classes


class RandomLabels(grain.transforms.Map):
  """Adds / replaces `label` with `random_label` (stateless: exact across resume)."""

  def __init__(self, ratio: float, num_classes: int, seed: int):
    if not 0.0 <= ratio <= 1.0:
      raise ValueError(f"random_label_ratio must be in [0, 1], got {ratio}")
    if num_classes < 2:
      raise ValueError("random labels need at least 2 classes")
    self.ratio, self.num_classes, self.seed = ratio, num_classes, seed

  def map(self, record):
    if transforms.is_bad(record):
      return record
    label = record.get("label")
    record["label"] = np.int32(random_label(
        record["__key__"], None if label is None else int(label), ratio=self.ratio,
        num_classes=self.num_classes, seed=self.seed))
    return record


def build(config) -> methods.Built:
  b = config.bridge
  # Embeddings in, features out: neither the token table nor the LM head is read.
  smollm = llm_lib.from_config(b.llm, dtype=config.get("dtype", "float32"), tokens=False,
                               lm_head=False)
  model = Model(llm=smollm.module.clone(drop_path=float(b.get("drop_path", 0.0))),
                num_classes=config.model.num_classes,
                patch_size=config.model.get("patch_size", 4),
                pooling=config.model.get("pooling", "last"),
                dtype=jnp.dtype(config.get("dtype", "float32")))
  pretrained = {"llm": smollm.params} if b.get("pretrained", True) else None
  return methods.Built(model, pretrained=pretrained)


def input_extras(config) -> methods.InputExtras:
  """Random labels (ratio > 0): replaces the data's labels, or adds them to captioned data."""
  ratio = float(config.bridge.get("random_label_ratio", 0.0))
  if ratio <= 0:
    return methods.InputExtras(tokenize=False)
  labelled = bool(config.input.get("label", False))
  return methods.InputExtras(
      transforms=(RandomLabels(ratio, config.model.num_classes, config.seed),),
      keys=() if labelled else ("label",), tokenize=False)


def build_tokenizer(config):
  del config
  return None
