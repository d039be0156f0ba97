"""Supervised image classifier (ResNet or ViT/DeiT), with GPT4Image's text projector.

GPT4Image (arXiv 2306.00693) trains an ordinary classifier with L = CE + λ·L_text, where
L_text aligns a projection of the pooled feature with a frozen text encoder's embedding
of an LLM-written description of the image (see vlpre/describe.py, vlpre/embed.py and
vlpre/losses/classification.py). The projector, Linear(d→2D, no bias) → BatchNorm → ReLU →
Linear(2D→D), is used only in training: evaluation reads `classify` / `embed_image`.

Outputs of `__call__(batch, train=...)`:
  logits [B, C], feature [B, d] (pooled backbone output),
  targets [B, C]       soft labels, only when mixup/cutmix mixed the batch,
  zproj [B, D]         the projected feature, when a text dim is configured,
  text_temperature, label_smoothing   fixed loss hyperparameters (scalars).

BatchNorm uses `use_running_average=not train` and keeps `batch_stats` (carried by the
trainer in TrainState.model_state). Under jit with the batch sharded over the data axes
its mean/var are reductions over the GLOBAL batch (XLA inserts the all-reduce), i.e.
synchronised BatchNorm without an `axis_name`; tests/test_gpt4image.py checks it.

Shape letters: B batch, H/W spatial, C classes (or channels where said), d feature width,
D text embedding dim.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpre import models
from vlpre.models import layers
from vlpre.models.two_tower import vit_from_config

# Residual blocks per stage (He et al. 2016).
RESNET_STAGES = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
}

# torchvision's kaiming_normal_(mode="fan_out") for convs.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, strides: int = 1, name: str | None = None, dtype=jnp.float32):
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding=[(kernel // 2,) * 2] * 2,
                 use_bias=False, dtype=dtype, name=name,
                 kernel_init=layers.dense_init((None, None, "conv_in", "conv_out"), _CONV_INIT))


def batch_norm(train: bool, dtype, name: str | None = None,
               zero_scale: bool = False) -> nn.BatchNorm:
  """torch's BatchNorm defaults (momentum 0.1 there = 0.9 here, eps 1e-5), logically named."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      scale_init=layers.norm_init(nn.initializers.zeros if zero_scale
                                                  else nn.initializers.ones),
                      bias_init=layers.norm_init(nn.initializers.zeros), name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""
  features: int
  strides: int = 1
  zero_init_residual: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    bn = functools.partial(batch_norm, train, self.dtype)
    conv = functools.partial(_conv, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.features, 3, self.strides, "conv1")(x_BxHxWxC)))
    y = bn(name="bn2", zero_scale=self.zero_init_residual)(conv(self.features, 3, 1, "conv2")(y))
    shortcut = x_BxHxWxC
    if shortcut.shape != y.shape:
      shortcut = bn(name="proj_bn")(conv(self.features, 1, self.strides, "proj")(x_BxHxWxC))
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """1x1 → 3x3 (strided, as torchvision's ResNet v1.5) → 1x1 with 4x expansion (ResNet-50+)."""
  features: int
  strides: int = 1
  zero_init_residual: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, *, train: bool):
    bn = functools.partial(batch_norm, train, self.dtype)
    y = nn.relu(bn(name="bn1")(_conv(self.features, 1, 1, "conv1", self.dtype)(x_BxHxWxC)))
    y = nn.relu(bn(name="bn2")(_conv(self.features, 3, self.strides, "conv2", self.dtype)(y)))
    y = bn(name="bn3", zero_scale=self.zero_init_residual)(
        _conv(self.features * 4, 1, 1, "conv3", self.dtype)(y))
    shortcut = x_BxHxWxC
    if shortcut.shape != y.shape:
      shortcut = bn(name="proj_bn")(
          _conv(self.features * 4, 1, self.strides, "proj", self.dtype)(x_BxHxWxC))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet → global average pool. Returns the pooled feature [B, d].

  Attributes:
    stage_sizes: blocks per stage.
    block: "basic" | "bottleneck".
    width: channels of the first stage (64 in the paper; smaller for CPU runs), doubled
      at each later stage.
    cifar_stem: a 3x3 stride-1 conv and no max-pool, for 32 px inputs (the 7x7/2 conv +
      3x3/2 pool of the ImageNet stem would leave 1x1 maps at the last stage).
    zero_init_residual: last BN scale of each block at 0, so every block starts as the
      identity (Goyal et al. 2017); helps short runs most.
  """
  stage_sizes: tuple[int, ...]
  block: str = "basic"
  width: int = 64
  cifar_stem: bool = False
  zero_init_residual: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image_BxHxWx3, *, train: bool):
    block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
    x = image_BxHxWx3.astype(self.dtype)
    if self.cifar_stem:
      x = _conv(self.width, 3, 1, "stem_conv", self.dtype)(x)
    else:
      x = _conv(self.width, 7, 2, "stem_conv", self.dtype)(x)
    x = nn.relu(batch_norm(train, self.dtype, name="stem_bn")(x))
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        x = block_cls(self.width * 2**stage, strides=2 if stage > 0 and i == 0 else 1,
                      zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                      name=f"stage{stage + 1}_block{i + 1}")(x, train=train)
    return jnp.mean(x, axis=(1, 2))


class Projector(nn.Module):
  """GPT4Image's Linear(d→2D, no bias) → BatchNorm → ReLU → Linear(2D→D)."""
  text_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feature_Bxd, *, train: bool):
    h_Bx2D = nn.Dense(2 * self.text_dim, use_bias=False, dtype=self.dtype, name="fc1",
                      kernel_init=layers.dense_init(("embed", "mlp")))(feature_Bxd)
    h_Bx2D = nn.relu(batch_norm(train, self.dtype, name="bn")(h_Bx2D))
    # The text dim plays the model-width role here: "embed" lets fsdp split this matrix.
    return nn.Dense(self.text_dim, dtype=self.dtype, name="fc2",
                    kernel_init=layers.dense_init(("mlp", "embed")),
                    bias_init=layers.dense_init(("embed",), nn.initializers.zeros))(h_Bx2D)


def mix_batch(rng: jax.Array, image_BxHxWx3: jax.Array, targets_BxC: jax.Array, *,
              mixup_alpha: float, cutmix_alpha: float) -> tuple[jax.Array, jax.Array]:
  """Mixup or CutMix (one of them per batch, each half the time when both are on).

  Every image is mixed with the batch reversed (timm's "batch" mode, flipped partner), so
  the op is a fixed permutation that XLA shards like any other. The CutMix λ is corrected
  to the pasted box's true area.
  """
  rng_switch, rng_mix, rng_cut, rng_box = jax.random.split(rng, 4)
  partner = image_BxHxWx3[::-1]
  height, width = image_BxHxWx3.shape[1:3]
  lam_mix = jax.random.beta(rng_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  mixed = lam_mix * image_BxHxWx3 + (1.0 - lam_mix) * partner
  if cutmix_alpha <= 0:
    lam, image = lam_mix, mixed
  else:
    lam_cut = jax.random.beta(rng_cut, cutmix_alpha, cutmix_alpha)
    ratio = jnp.sqrt(1.0 - lam_cut)
    center = jax.random.uniform(rng_box, (2,)) * jnp.array([height, width])
    half = jnp.array([height, width]) * ratio / 2
    top, left = jnp.clip(jnp.round(center - half), 0, jnp.array([height, width]))
    bottom, right = jnp.clip(jnp.round(center + half), 0, jnp.array([height, width]))
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box_HxW = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    cut = jnp.where(box_HxW[None, :, :, None], partner, image_BxHxWx3)
    lam_cut = 1.0 - (bottom - top) * (right - left) / (height * width)
    use_cut = jax.random.bernoulli(rng_switch, 0.5) if mixup_alpha > 0 else True
    lam = jnp.where(use_cut, lam_cut, lam_mix)
    image = jnp.where(use_cut, cut, mixed)
  return image, lam * targets_BxC + (1.0 - lam) * targets_BxC[::-1]


class Model(nn.Module):
  """Backbone → pooled feature → linear head; GPT4Image's projector when text_dim > 0.

  Attributes:
    num_classes: C.
    backbone: resnet18 | resnet34 | resnet50 | resnet101 | vit.
    width: ResNet first-stage channels.
    cifar_stem: ResNet stem for 32 px inputs.
    zero_init_residual: see ResNet.
    vit: ViT keyword arguments (vlpre.models.vit.ViT; "variant" like "S/16" allowed).
    text_dim: D of the description embeddings; 0 = no projector (the CE-only baseline).
    text_temperature: the FIXED InfoNCE temperature (paper: 0.2 CNN, 0.05 ViT).
    label_smoothing: ε of softmax_ce.
    mixup_alpha, cutmix_alpha: Beta(α, α) mixing inside the train step; 0 = off.
    dtype: computation dtype (params stay float32).
  """
  num_classes: int
  backbone: str = "resnet18"
  width: int = 64
  cifar_stem: bool = False
  zero_init_residual: bool = True
  vit: dict[str, Any] | None = None
  text_dim: int = 0
  text_temperature: float = 0.2
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    if self.backbone == "vit":
      self.net = vit_from_config({"pool": "cls", **(self.vit or {})}, self.dtype, name="vit")
    elif self.backbone in RESNET_STAGES:
      stages, block = RESNET_STAGES[self.backbone]
      self.net = ResNet(stages, block, self.width, self.cifar_stem, self.zero_init_residual,
                        self.dtype, name="resnet")
    else:
      raise ValueError(f"unknown backbone {self.backbone!r}: vit or one of {sorted(RESNET_STAGES)}")
    # Zero head: the first loss is exactly log C and early steps do not fight a random head.
    self.head = nn.Dense(self.num_classes, dtype=self.dtype,
                         kernel_init=layers.dense_init(("embed", "classes"), nn.initializers.zeros),
                         bias_init=layers.dense_init(("classes",), nn.initializers.zeros))
    if self.text_dim:
      self.projector = Projector(self.text_dim, self.dtype)

  def _feature(self, image_BxHxWx3, train: bool):
    if self.backbone == "vit":
      pooled_Bxd, _ = self.net(image_BxHxWx3, train=train)
    else:
      pooled_Bxd = self.net(image_BxHxWx3, train=train)
    return nn.with_logical_constraint(pooled_Bxd, ("batch", "act_embed"))

  def embed_image(self, image, train: bool = False):
    """For the linear_probe evaluator: the pooled feature, as `zimg` and `pre_logits`."""
    feature_Bxd = self._feature(image, train).astype(jnp.float32)
    return {"zimg": feature_Bxd, "pre_logits": feature_Bxd}

  def classify(self, image):
    """Class logits [B, C] of the evaluation path (BatchNorm on running statistics)."""
    return self.head(self._feature(image, False)).astype(jnp.float32)

  def __call__(self, batch, *, train: bool = False):
    image_BxHxWx3 = batch["image"]
    out = {}
    if train and (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
      targets_BxC = jax.nn.one_hot(batch["label"], self.num_classes, dtype=jnp.float32)
      image_BxHxWx3, out["targets"] = mix_batch(
          self.make_rng("aug"), image_BxHxWx3.astype(jnp.float32), targets_BxC,
          mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha)
    feature_Bxd = self._feature(image_BxHxWx3, train)
    out["logits"] = self.head(feature_Bxd).astype(jnp.float32)
    out["feature"] = feature_Bxd.astype(jnp.float32)
    out["label_smoothing"] = jnp.float32(self.label_smoothing)
    if self.text_dim:
      out["zproj"] = self.projector(feature_Bxd, train=train).astype(jnp.float32)
      out["text_temperature"] = jnp.float32(self.text_temperature)
    return out


def text_loss_enabled(config) -> bool:
  """Whether the run uses the description embeddings (GPT4Image) or is the CE-only baseline."""
  return float(config.get("text_loss_weight", 0.0)) > 0


def _store(config):
  from vlpre import embed  # pylint: disable=g-import-not-at-top
  return embed.EmbeddingStore(embed.cache_dir(config), embed.encoder_settings(config))


def input_extras(config) -> models.InputExtras:
  """Joins each image's description embedding (`txt_emb`) by key, when the text loss is on."""
  if not text_loss_enabled(config):
    return models.InputExtras(tokenize=False)
  from vlpre import embed  # pylint: disable=g-import-not-at-top
  return models.InputExtras(transforms=(embed.LookupEmbedding(_store(config)),),
                            keys=("txt_emb",), tokenize=False)


def build(config) -> models.Built:
  """The classifier; its projector's width is the embedding store's (0 for the baseline)."""
  text_dim = _store(config).dim if text_loss_enabled(config) else 0
  kwargs = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  return models.Built(Model(text_dim=text_dim, dtype=jnp.dtype(config.get("dtype", "float32")),
                            **kwargs))


def build_tokenizer(config):
  """No text enters the step: descriptions arrive as precomputed embeddings."""
  del config
  return None
