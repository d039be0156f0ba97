"""Transformer building blocks shared by every tower, annotated with logical axis names.

Shape letters: B batch, N tokens (image patches or text positions), D width,
H heads, K per-head dim, F MLP hidden width.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dense_init(names: tuple[str | None, ...], init: Callable = nn.initializers.xavier_uniform()):
  return nn.with_logical_partitioning(init, names)


def norm_init(init: Callable = nn.initializers.ones):
  return nn.with_logical_partitioning(init, ("norm",))


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=dtype, scale_init=norm_init(), bias_init=norm_init(nn.initializers.zeros),
                      name=name)


class MlpBlock(nn.Module):
  """Linear → GELU → Linear, the transformer feed-forward block."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD, *, train: bool):
    width = x_BxNxD.shape[-1]
    h_BxNxF = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init(("embed", "mlp")),
                       bias_init=dense_init(("mlp",), nn.initializers.normal(1e-6)))(x_BxNxD)
    h_BxNxF = nn.with_logical_constraint(nn.gelu(h_BxNxF), ("batch", "length", "act_mlp"))
    h_BxNxF = nn.Dropout(self.dropout)(h_BxNxF, deterministic=not train)
    return nn.Dense(width, dtype=self.dtype, kernel_init=dense_init(("mlp", "embed")),
                    bias_init=dense_init(("embed",), nn.initializers.normal(1e-6)))(h_BxNxF)


class Attention(nn.Module):
  """Multi-head self-attention on jax.nn.dot_product_attention (fused where supported)."""
  num_heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None):
    width = x_BxNxD.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by {self.num_heads} heads")
    head_dim = width // self.num_heads

    def proj(name):
      return nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name,
                             kernel_init=dense_init(("embed", "heads", "kv")),
                             bias_init=dense_init(("heads", "kv"), nn.initializers.zeros))(x_BxNxD)

    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = proj("query"), proj("key"), proj("value")
    mask = None
    if mask_BxN is not None:  # Key padding mask, broadcast over heads and queries.
      mask = mask_BxN[:, None, None, :].astype(bool)
    o_BxNxHxK = jax.nn.dot_product_attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, mask=mask,
                                             is_causal=self.causal)
    o_BxNxHxK = nn.with_logical_constraint(o_BxNxHxK, ("batch", "length", "act_heads", None))
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                           kernel_init=dense_init(("heads", "kv", "embed")),
                           bias_init=dense_init(("embed",), nn.initializers.zeros))(o_BxNxHxK)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block. Returns (x, None) so it can be scanned over depth."""
  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None, train: bool = False):
    x_BxNxD = nn.with_logical_constraint(x_BxNxD, ("batch", "length", "act_embed"))
    y = Attention(self.num_heads, causal=self.causal, dtype=self.dtype, name="attn")(
        layer_norm(self.dtype, "ln_attn")(x_BxNxD), mask_BxN)
    x_BxNxD = x_BxNxD + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="mlp")(
        layer_norm(self.dtype, "ln_mlp")(x_BxNxD), train=train)
    x_BxNxD = x_BxNxD + nn.Dropout(self.dropout)(y, deterministic=not train)
    return x_BxNxD, None


class Encoder(nn.Module):
  """A stack of `depth` blocks, scanned (one compiled block, params stacked on `layers`).

  Scanning keeps compile time flat in depth; `remat` recomputes activations in the
  backward pass to trade FLOPs for memory (gradient checkpointing).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  remat: bool = False
  scan: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None, train: bool = False):
    block = EncoderBlock
    if self.remat:
      block = nn.remat(block, static_argnums=(3,), prevent_cse=not self.scan,
                       policy=jax.checkpoint_policies.nothing_saveable)
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, causal=self.causal,
                  dropout=self.dropout, dtype=self.dtype)
    if self.scan:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})(name="blocks", **kwargs)
      x_BxNxD, _ = stack(x_BxNxD, mask_BxN, train)
    else:
      for i in range(self.depth):
        x_BxNxD, _ = block(name=f"block_{i}", **kwargs)(x_BxNxD, mask_BxN, train)
    return layer_norm(self.dtype, "ln_final")(x_BxNxD)


class MapHead(nn.Module):
  """Multihead attention pooling: one learnable query attends over the tokens."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD):
    batch, _, width = x_BxNxD.shape
    probe_1x1xD = self.param("probe", dense_init((None, None, "embed")), (1, 1, width))
    probe_Bx1xD = jnp.tile(probe_1x1xD, (batch, 1, 1)).astype(self.dtype)
    head_dim = width // self.num_heads
    q = nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name="query",
                        kernel_init=dense_init(("embed", "heads", "kv")))(probe_Bx1xD)
    k = nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name="key",
                        kernel_init=dense_init(("embed", "heads", "kv")))(x_BxNxD)
    v = nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name="value",
                        kernel_init=dense_init(("embed", "heads", "kv")))(x_BxNxD)
    o = jax.nn.dot_product_attention(q, k, v)
    x_Bx1xD = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                              kernel_init=dense_init(("heads", "kv", "embed")))(o)
    y = layer_norm(self.dtype, "ln")(x_Bx1xD)
    x_Bx1xD = x_Bx1xD + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y, train=False)
    return x_Bx1xD[:, 0]
