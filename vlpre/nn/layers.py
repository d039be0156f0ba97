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

# Attention implementations (`attention=` of Attention / Encoder / ViT / TextTransformer):
#   "dot_product_attention": jax.nn.dot_product_attention (cuDNN's fused kernel on GPU
#     where it applies, XLA's otherwise);
#   "einsum": heads-major einsum → float32 softmax → einsum, which XLA:CPU runs faster
#     (bench/README.md "Where the step time goes");
#   "auto": "einsum" on CPU, "dot_product_attention" on GPU/TPU.
ATTENTION_IMPLEMENTATIONS = ("auto", "dot_product_attention", "einsum")


def resolve_attention(implementation: str) -> str:
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention {implementation!r} not in {ATTENTION_IMPLEMENTATIONS}")
  if implementation == "auto":
    return "einsum" if jax.default_backend() == "cpu" else "dot_product_attention"
  return implementation


def resolve_unroll(unroll: int | bool | None, depth: int) -> int:
  """Blocks per iteration of the scanned layer loop: None ("auto") unrolls it fully on
  CPU, where the unrolled program runs faster (bench/README.md), and keeps one block
  per iteration on GPU/TPU (smallest program, compile time flat in depth)."""
  if unroll is None:
    unroll = jax.default_backend() == "cpu"
  if isinstance(unroll, bool):
    return depth if unroll else 1
  if not 1 <= unroll <= depth:
    raise ValueError(f"unroll={unroll} must be in [1, depth={depth}]")
  return int(unroll)


def attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxHxTxS=None, *, causal: bool = False,
              implementation: str = "auto"):
  """softmax(q·kᵀ/√K + mask) · v per head, [B, T, H, K]; `mask` broadcasts to [B, H, T, S]
  (True = attend). Both implementations compute the same function."""
  implementation = resolve_attention(implementation)
  if implementation == "dot_product_attention":
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_BxHxTxS,
                                        is_causal=causal)
  dtype = q_BxTxHxK.dtype
  scale = q_BxTxHxK.shape[-1] ** -0.5
  # Heads-major operands make both products plain batched matmuls for XLA:CPU.
  q_BxHxTxK, k_BxHxSxK, v_BxHxSxK = (x.transpose(0, 2, 1, 3)
                                     for x in (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK))
  logits_BxHxTxS = jnp.einsum("bhtk,bhsk->bhts", q_BxHxTxK * jnp.asarray(scale, dtype), k_BxHxSxK,
                              preferred_element_type=jnp.float32)
  if causal:
    t, s = logits_BxHxTxS.shape[-2:]
    causal_TxS = jnp.tril(jnp.ones((t, s), bool), k=s - t)
    mask_BxHxTxS = causal_TxS if mask_BxHxTxS is None else (mask_BxHxTxS & causal_TxS)
  if mask_BxHxTxS is not None:
    logits_BxHxTxS = jnp.where(mask_BxHxTxS, logits_BxHxTxS,
                               jnp.finfo(jnp.float32).min)
  probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1).astype(dtype)
  out_BxHxTxK = jnp.einsum("bhts,bhsk->bhtk", probs_BxHxTxS, v_BxHxSxK)
  return out_BxHxTxK.transpose(0, 2, 1, 3)


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
  """Multi-head self-attention; `implementation` is one of ATTENTION_IMPLEMENTATIONS."""
  num_heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  implementation: str = "auto"

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
    o_BxNxHxK = attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, mask, causal=self.causal,
                          implementation=self.implementation)
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
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None, train: bool = False):
    x_BxNxD = nn.with_logical_constraint(x_BxNxD, ("batch", "length", "act_embed"))
    y = Attention(self.num_heads, causal=self.causal, dtype=self.dtype,
                  implementation=self.attention, name="attn")(
        layer_norm(self.dtype, "ln_attn")(x_BxNxD), mask_BxN)
    x_BxNxD = x_BxNxD + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="mlp")(
        layer_norm(self.dtype, "ln_mlp")(x_BxNxD), train=train)
    x_BxNxD = x_BxNxD + nn.Dropout(self.dropout)(y, deterministic=not train)
    return x_BxNxD, (x_BxNxD if self.emit_output else None)


class Encoder(nn.Module):
  """A stack of `depth` blocks, scanned (params stacked on `layers`) or one module per block.

  Scanning keeps compile time flat in depth; `remat` recomputes activations in the
  backward pass to trade FLOPs for memory (gradient checkpointing). `unroll` is how many
  blocks one iteration of the scanned loop runs (resolve_unroll: None = auto, fully
  unrolled on CPU, 1 on GPU/TPU; True = depth): the parameters stay stacked either way,
  so checkpoints do not depend on it. `scan=False` instead gives every block its own
  parameter subtree (block_0, ...). `attention` picks the attention implementation.

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
  unroll: int | bool | None = None
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None, train: bool = False):
    block = EncoderBlock
    if self.remat:
      block = nn.remat(block, static_argnums=(3,), prevent_cse=not self.scan,
                       policy=jax.checkpoint_policies.nothing_saveable)
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, causal=self.causal,
                  dropout=self.dropout, emit_output=self.return_all_blocks, dtype=self.dtype,
                  attention=self.attention)
    if self.scan:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                      unroll=resolve_unroll(self.unroll, self.depth),
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
  attention: str = "auto"

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
    o = attention(q, k, v, implementation=self.attention)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                          kernel_init=dense_init(("heads", "kv", "embed")))
    x_Bx1xD = out(o)
    y = layer_norm(self.dtype, "ln")(x_Bx1xD)
    x_Bx1xD = x_Bx1xD + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y, train=False)
    if return_patch_latents:
      latents_BxNxD = nn.with_logical_constraint(out(v), ("batch", "length", "act_embed"))
      return x_Bx1xD[:, 0], latents_BxNxD
    return x_Bx1xD[:, 0]
