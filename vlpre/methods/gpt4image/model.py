"""Supervised image classifier (ResNet or ViT/DeiT), with GPT4Image's text projector.

GPT4Image (arXiv 2306.00693) trains an ordinary classifier with L = CE + λ·L_text, where
L_text aligns a projection of the pooled feature with a frozen text encoder's embedding
of an LLM-written description of the image (see describe.py here, vlpre/embed.py and
vlpre/losses/classification.py). The projector, Linear(d→2D, no bias) → BatchNorm → ReLU →
Linear(2D→D), is used only in training: evaluation reads `classify` / `embed_image`.

Outputs of `__call__(batch, train=...)`:
  logits [B, C], feature [B, d] (pooled backbone output),
  targets [B, C]       soft labels, only when mixup/cutmix mixed the batch,
  zproj [B, D]         the projected feature, when a text dim is configured,
  text_temperature, label_smoothing   fixed loss hyperparameters (scalars).

The backbone is looked up by name in `BACKBONES`; a new one is an entry there. BatchNorm
(vlpre/nn/resnet.py) keeps `batch_stats`, carried by the trainer in
TrainState.model_state, and is synchronised over the global batch under jit;
tests/test_gpt4image.py checks it.

Shape letters: B batch, H/W spatial, C classes (or channels where said), d feature width,
D text embedding dim.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpre import methods
from vlpre.text_encoders import store
from vlpre.nn import layers
from vlpre.nn.resnet import RESNET_STAGES, ResNet, batch_norm
from vlpre.nn.vit import vit_from_config


@dataclasses.dataclass(frozen=True)
class Backbone:
  """How the classifier builds one backbone and reads its pooled [B, d] and per-position
  [B, N, d] features."""
  # Called inside Model.setup with the Model, whose fields configure the backbone; the
  # module's name is fixed here because checkpoints (and their frozen/sharding regexes)
  # address its parameters by it.
  build: Callable[[Any], nn.Module]
  # (module, image) → the per-position features [B, N, d] before pooling, in eval mode.
  patch_tokens: Callable[[Any, jax.Array], jax.Array]
  # The module's `__call__(image, train=...)` output → the pooled feature.
  pooled: Callable[[Any], jax.Array] = lambda out: out


def _vit(model) -> nn.Module:
  return vit_from_config({"pool": "cls", **(model.vit or {})}, model.dtype, name="vit")


def _vit_patch_tokens(vit, image_BxHxWx3):
  return vit.encode(image_BxHxWx3, all_levels=False)["tokens"]


def _resnet_patch_tokens(resnet: ResNet, image_BxHxWx3):
  """The last stage's map [B, h*w, d], the one ResNet averages into its pooled feature.

  ResNet returns only the mean, so the last block's output is caught as it is computed
  (flax's method interception) rather than recomputed with a copy of the network.
  """
  last_block = f"stage{len(resnet.stage_sizes)}_block{resnet.stage_sizes[-1]}"
  caught = []

  def catch(call, args, kwargs, context):
    out = call(*args, **kwargs)
    if context.method_name == "__call__" and context.module.name == last_block:
      caught.append(out)
    return out

  with nn.intercept_methods(catch):
    resnet(image_BxHxWx3, train=False)
  (map_BxHxWxd,) = caught
  batch, height, width, channels = map_BxHxWxd.shape
  return map_BxHxWxd.reshape(batch, height * width, channels)


def _resnet(stages_name: str, model) -> nn.Module:
  stages, block = RESNET_STAGES[stages_name]
  return ResNet(stages, block, model.width, model.cifar_stem, model.zero_init_residual,
                model.dtype, name="resnet")


BACKBONES: dict[str, Backbone] = {
    "vit": Backbone(_vit, pooled=lambda out: out[0],  # ViT returns (pooled, tokens)
                    patch_tokens=_vit_patch_tokens),
    **{name: Backbone(functools.partial(_resnet, name), patch_tokens=_resnet_patch_tokens)
       for name in RESNET_STAGES},
}


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
    backbone: a key of BACKBONES: resnet18 | resnet34 | resnet50 | resnet101 | vit.
    width: ResNet first-stage channels.
    cifar_stem: ResNet stem for 32 px inputs.
    zero_init_residual: see ResNet.
    vit: ViT keyword arguments (vlpre.nn.vit.ViT; "variant" like "S/16" allowed).
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
    if self.backbone not in BACKBONES:
      raise ValueError(f"unknown backbone {self.backbone!r}: one of {sorted(BACKBONES)}")
    self.net = BACKBONES[self.backbone].build(self)
    # Zero head: the first loss is exactly log C and early steps do not fight a random head.
    self.head = nn.Dense(self.num_classes, dtype=self.dtype,
                         kernel_init=layers.dense_init(("embed", "classes"), nn.initializers.zeros),
                         bias_init=layers.dense_init(("classes",), nn.initializers.zeros))
    if self.text_dim:
      self.projector = Projector(self.text_dim, self.dtype)

  def _feature(self, image_BxHxWx3, train: bool):
    pooled_Bxd = BACKBONES[self.backbone].pooled(self.net(image_BxHxWx3, train=train))
    return nn.with_logical_constraint(pooled_Bxd, ("batch", "act_embed"))

  def embed_image(self, image, train: bool = False):
    """For the linear_probe evaluator: the pooled feature, as `zimg` and `pre_logits`."""
    feature_Bxd = self._feature(image, train).astype(jnp.float32)
    return {"zimg": feature_Bxd, "pre_logits": feature_Bxd}

  def embed_patches(self, image):
    """For attentive probes: the backbone's per-position features [B, N, d] (eval mode)."""
    return BACKBONES[self.backbone].patch_tokens(self.net, image).astype(jnp.float32)

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
  return store.EmbeddingStore(store.cache_dir(config), store.encoder_settings(config))


def input_extras(config) -> methods.InputExtras:
  """Joins each image's description embedding (`txt_emb`) by key, when the text loss is on."""
  if not text_loss_enabled(config):
    return methods.InputExtras(tokenize=False)
  return methods.InputExtras(transforms=(store.LookupEmbedding(_store(config)),),
                            keys=("txt_emb",), tokenize=False)


def build(config) -> methods.Built:
  """The classifier; its projector's width is the embedding store's (0 for the baseline)."""
  text_dim = _store(config).dim if text_loss_enabled(config) else 0
  kwargs = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  return methods.Built(Model(text_dim=text_dim, dtype=jnp.dtype(config.get("dtype", "float32")),
                            **kwargs))


def build_tokenizer(config):
  """No text enters the step: descriptions arrive as precomputed embeddings."""
  del config
  return None
