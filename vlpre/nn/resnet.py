"""ResNet with torchvision's layout and initialisation (He et al. 2016; v1.5 strides).

BatchNorm uses `use_running_average=not train` and keeps `batch_stats`. Under jit with
the batch sharded over the data axes its mean/var are reductions over the GLOBAL batch
(XLA inserts the all-reduce), i.e. synchronised BatchNorm without an `axis_name`.

Shape letters: B batch, H/W spatial, C channels, d pooled feature width.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlpre.nn import layers

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
