"""Transformer building blocks shared by every tower, annotated with logical axis names.

Shape letters: B batch, N tokens (image patches or text positions), D width,
H heads, K per-head dim, F MLP hidden width, R encoder blocks (depth).
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
  """Pre-LN transformer block. Returns (x, ys) so it can be scanned over depth.

  ys is the block's output again when `emit_output` (the scan stacks it over depth), else
  None, so a scan that does not need every block's output stores nothing extra.
  """
  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  emit_output: bool = False
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
    return x_BxNxD, (x_BxNxD if self.emit_output else None)


class Encoder(nn.Module):
  """A stack of `depth` blocks, scanned (one compiled block, params stacked on `layers`).

  Scanning keeps compile time flat in depth; `remat` recomputes activations in the
  backward pass to trade FLOPs for memory (gradient checkpointing).

  Returns the final tokens after `ln_final`, [B, N, D]; with `return_all_blocks`, the
  pair (final tokens, blocks_RxBxNxD): every block's output before `ln_final`, stacked
  over depth (the scan's ys; the unrolled loop stacks the same values), for methods that
  read multi-level features. Off by default: the stack costs depth × activations.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  remat: bool = False
  scan: bool = True
  return_all_blocks: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None, train: bool = False):
    block = EncoderBlock
    if self.remat:
      block = nn.remat(block, static_argnums=(3,), prevent_cse=not self.scan,
                       policy=jax.checkpoint_policies.nothing_saveable)
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, causal=self.causal,
                  dropout=self.dropout, emit_output=self.return_all_blocks, dtype=self.dtype)
    if self.scan:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})(name="blocks", **kwargs)
      x_BxNxD, blocks_RxBxNxD = stack(x_BxNxD, mask_BxN, train)
    else:
      outputs = []
      for i in range(self.depth):
        x_BxNxD, output_BxNxD = block(name=f"block_{i}", **kwargs)(x_BxNxD, mask_BxN, train)
        outputs.append(output_BxNxD)
      blocks_RxBxNxD = jnp.stack(outputs) if self.return_all_blocks else None
    x_BxNxD = layer_norm(self.dtype, "ln_final")(x_BxNxD)
    if self.return_all_blocks:
      return x_BxNxD, blocks_RxBxNxD
    return x_BxNxD


class MapHead(nn.Module):
  """Multihead attention pooling: one learnable query attends over the tokens.

  Returns the pooled [B, D]; with `return_patch_latents`, the pair (pooled, latents_BxNxD)
  where latent n = out(value(x_n)), the same block's projections applied to each token:
  what the attention output would be if every head put all its weight on token n, before
  the LayerNorm + MLP residual (the per-patch "visual tokens" of LCL). With one head the
  pooled output before that residual is Σ_n a_n·latent_n; with several, each head mixes
  its own slice of the value with its own weights, and it equals latent n exactly when
  every head attends only to token n.
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD, *, return_patch_latents: bool = False):
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
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                          kernel_init=dense_init(("heads", "kv", "embed")))
    x_Bx1xD = out(o)
    y = layer_norm(self.dtype, "ln")(x_Bx1xD)
    x_Bx1xD = x_Bx1xD + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y, train=False)
    if return_patch_latents:
      latents_BxNxD = nn.with_logical_constraint(out(v), ("batch", "length", "act_embed"))
      return x_Bx1xD[:, 0], latents_BxNxD
    return x_Bx1xD[:, 0]
