"""Transformer building blocks shared by every tower, annotated with logical axis names.

Shape letters: B batch, N tokens (image patches or text positions), D width,
H heads, K per-head dim, F MLP hidden width, R encoder blocks (depth).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpre.nn import attention as attention_lib
from vlpre.nn import stack as stack_lib

Dtype = Any


class _Named(nn.LogicallyPartitioned):
  """A weight with logical axis names, constrained to them only once it has their rank:
  nn.DenseGeneral initialises a [D, H, K] kernel flat ([D, H*K]) and unboxes it before
  reshaping, where a 3-name constraint would not apply."""

  def unbox(self, apply_constraint=True):
    return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def dense_init(names: tuple[str | None, ...], init: Callable = nn.initializers.xavier_uniform()):
  """`init` whose result carries the logical axis `names` (nn.with_logical_partitioning)."""
  def named(*args, **kwargs):
    return _Named(init(*args, **kwargs), names)
  return named


def norm_init(init: Callable = nn.initializers.ones):
  return nn.with_logical_partitioning(init, ("norm",))


# The MLP's activation (`act=` of the towers), by the name Hugging Face configs give it
# (`hidden_act`) in brackets: "gelu_tanh" (gelu_pytorch_tanh; vlpre's default and
# SigLIP's), "gelu" (exact erf: open_clip's non-OpenAI models, DINOv2), "quick_gelu"
# (x·σ(1.702x): OpenAI CLIP). Public weights keep the activation they were trained with.
ACTIVATIONS = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
NORM_EPS = 1e-6  # LayerNorm epsilon (flax's and big_vision's; CLIP's public towers use 1e-5)


def layer_norm(dtype: Dtype, name: str | None = None, eps: float = NORM_EPS) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, scale_init=norm_init(),
                      bias_init=norm_init(nn.initializers.zeros), name=name)


def activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} not in {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Linear → GELU → Linear, the transformer feed-forward block."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  act: str = "gelu_tanh"  # a key of ACTIVATIONS

  @nn.compact
  def __call__(self, x_BxNxD, *, train: bool):
    width = x_BxNxD.shape[-1]
    h_BxNxF = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init(("embed", "mlp")),
                       bias_init=dense_init(("mlp",), nn.initializers.normal(1e-6)))(x_BxNxD)
    h_BxNxF = nn.with_logical_constraint(activation(self.act)(h_BxNxF),
                                         ("batch", "length", "act_mlp"))
    h_BxNxF = nn.Dropout(self.dropout)(h_BxNxF, deterministic=not train)
    return nn.Dense(width, dtype=self.dtype, kernel_init=dense_init(("mlp", "embed")),
                    bias_init=dense_init(("embed",), nn.initializers.normal(1e-6)))(h_BxNxF)


class Attention(nn.Module):
  """Multi-head self-attention; `implementation` is one of vlpre.nn.attention.IMPLEMENTATIONS."""
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
    mask = None if mask_BxN is None else attention_lib.padding_mask(mask_BxN)
    o_BxNxHxK = attention_lib.attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, mask, causal=self.causal,
                                        implementation=self.implementation)
    o_BxNxHxK = nn.with_logical_constraint(o_BxNxHxK, ("batch", "length", "act_heads", None))
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                           kernel_init=dense_init(("heads", "kv", "embed")),
                           bias_init=dense_init(("embed",), nn.initializers.zeros))(o_BxNxHxK)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block, `(x, mask, train, layer_inputs) -> (x, ys)` (vlpre.nn.stack).

  layer_inputs: (None, this block's drop-path rate), applied when `drop_path` and
  training. ys is the block's output again when `emit_output` (the scan stacks it over
  depth), else None, so a scan that does not need every block's output stores nothing.
  """
  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  drop_path: bool = False
  emit_output: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  act: str = "gelu_tanh"
  norm_eps: float = NORM_EPS

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None, train: bool = False, layer_inputs=(None, 0.0)):
    _, drop_rate = layer_inputs

    def residual(branch_BxNxD):
      branch_BxNxD = nn.Dropout(self.dropout)(branch_BxNxD, deterministic=not train)
      if self.drop_path and train:
        branch_BxNxD = stack_lib.drop_path(branch_BxNxD, drop_rate, self.make_rng("dropout"))
      return branch_BxNxD

    x_BxNxD = nn.with_logical_constraint(x_BxNxD, ("batch", "length", "act_embed"))
    y = Attention(self.num_heads, causal=self.causal, dtype=self.dtype,
                  implementation=self.attention, name="attn")(
        layer_norm(self.dtype, "ln_attn", self.norm_eps)(x_BxNxD), mask_BxN)
    x_BxNxD = x_BxNxD + residual(y)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.act, name="mlp")(
        layer_norm(self.dtype, "ln_mlp", self.norm_eps)(x_BxNxD), train=train)
    x_BxNxD = x_BxNxD + residual(y)
    return x_BxNxD, (x_BxNxD if self.emit_output else None)


class Encoder(nn.Module):
  """A stack of `depth` blocks (vlpre.nn.stack), scanned (params stacked on `layers`,
  named `blocks`) or one module per block (`scan=False`: block_0, ...).

  Scanning keeps compile time flat in depth; `remat` recomputes activations in the
  backward pass to trade FLOPs for memory (True = "full", or a key of
  vlpre.nn.stack.REMAT_POLICIES). `unroll` is how many blocks one iteration of the
  scanned loop runs (resolve_unroll: None = auto, fully unrolled on CPU, 1 on GPU/TPU;
  True = depth): the parameters stay stacked either way, so checkpoints do not depend on
  it. `drop_path` is the last block's stochastic-depth rate in training (0 at the first).
  `attention` picks the attention implementation (vlpre.nn.attention.IMPLEMENTATIONS).

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
  remat: bool | str = False
  scan: bool = True
  return_all_blocks: bool = False
  dtype: Dtype = jnp.float32
  unroll: int | bool | None = None
  attention: str = "auto"
  drop_path: float = 0.0
  act: str = "gelu_tanh"       # the MLPs' activation (ACTIVATIONS)
  norm_eps: float = NORM_EPS   # every LayerNorm's epsilon

  @nn.compact
  def __call__(self, x_BxNxD, mask_BxN=None, train: bool = False):
    remat = {True: "full", False: "none"}.get(self.remat, self.remat)
    kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, causal=self.causal,
                  dropout=self.dropout, drop_path=self.drop_path > 0,
                  emit_output=self.return_all_blocks, dtype=self.dtype, attention=self.attention,
                  act=self.act, norm_eps=self.norm_eps)
    x_BxNxD, blocks = stack_lib.stack(
        EncoderBlock, kwargs, x_BxNxD, mask_BxN, train, depth=self.depth, scan=self.scan,
        remat=remat, static_argnums=(3,), unroll=self.unroll, drop_path_rate=self.drop_path,
        name="blocks", layer_name="block")
    x_BxNxD = layer_norm(self.dtype, "ln_final", self.norm_eps)(x_BxNxD)
    if self.return_all_blocks:
      return x_BxNxD, jnp.concatenate(blocks)
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
  act: str = "gelu_tanh"
  norm_eps: float = NORM_EPS

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
    o = attention_lib.attention(q, k, v, implementation=self.attention)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                          kernel_init=dense_init(("heads", "kv", "embed")))
    x_Bx1xD = out(o)
    y = layer_norm(self.dtype, "ln", self.norm_eps)(x_Bx1xD)
    x_Bx1xD = x_Bx1xD + MlpBlock(self.mlp_dim, dtype=self.dtype, act=self.act, name="mlp")(
        y, train=False)
    if return_patch_latents:
      latents_BxNxD = nn.with_logical_constraint(out(v), ("batch", "length", "act_embed"))
      return x_Bx1xD[:, 0], latents_BxNxD
    return x_Bx1xD[:, 0]
