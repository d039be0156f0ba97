"""A Flax Linen decoder-only transformer for Llama-family checkpoints.

Covers Llama, Mistral, Qwen2 and Qwen3 by configuration flags (RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP; optional q/k/v biases and per-head q/k RMSNorm).

Why vlpre has its own decoder instead of transformers' `FlaxLlamaModel`:
- transformers 4.57.6 `FlaxLlamaModel` builds its RoPE tables with base 10000 whatever
  `config.rope_theta` says, so a model trained with another base (SmolLM2: 1e5, Llama-3:
  5e5) gives wrong hidden states;
- it materialises a `max_position_embeddings`² causal mask (8192² for SmolLM2) even for
  77-token captions;
- there is no Flax class for Qwen2/3 at all.

Parameter names follow the Hugging Face checkpoint names (`layers.3.self_attn.q_proj.weight`
becomes `layers_3/self_attn/q_proj/kernel`, transposed), so loading is a mechanical rename;
see `checkpoints.state_dict_to_params`.

Shape letters: B batch, L sequence length, D model width, N query heads, K key/value heads,
H head width, F MLP width, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Model families this decoder implements; the flags in `DecoderConfig.from_hf` say how.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a Llama-family decoder (only what the forward pass needs).

  Plain scalar fields only, so the config is hashable and can sit on a Linen module.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # RoPE frequency scaling as in transformers' `ROPE_INIT_FUNCTIONS`: "default", "linear" or
  # "llama3" (Llama-3.1/3.2 checkpoints).
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  qkv_bias: bool = False  # Qwen2: q/k/v projections have biases, o_proj has none.
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE.
  sliding_window: int | None = None  # Mistral v0.1: keys at most this far back.

  @classmethod
  def from_hf(cls, hf_config: Any) -> DecoderConfig:
    """Reads a transformers Llama/Mistral/Qwen2/Qwen3 config."""
    model_type = hf_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise NotImplementedError(
          f"model_type {model_type!r} is not a decoder vlpre implements "
          f"(supported: {SUPPORTED_MODEL_TYPES})")
    hidden_act = getattr(hf_config, "hidden_act", "silu")
    if hidden_act != "silu":
      raise NotImplementedError(f"hidden_act {hidden_act!r}: only SwiGLU (silu) is implemented")
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads)
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads

    rope_kwargs = _rope_kwargs(getattr(hf_config, "rope_scaling", None))
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    qkv_bias, o_bias = attention_bias, attention_bias
    if model_type == "qwen2":
      # Qwen2 hard-codes biases on q/k/v and none on o_proj (its config has no flag).
      qkv_bias, o_bias = True, False
    elif model_type == "qwen3":
      o_bias = False  # Qwen3's `attention_bias` covers q/k/v; o_proj never has one.
    sliding_window = None
    if model_type == "mistral":
      sliding_window = getattr(hf_config, "sliding_window", None)
    elif model_type in ("qwen2", "qwen3") and getattr(hf_config, "use_sliding_window", False):
      # Qwen applies the window only to some layers (max_window_layers); not implemented.
      raise NotImplementedError(f"{model_type} with use_sliding_window=True")
    return cls(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=float(getattr(hf_config, "rope_theta", 10000.0)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        **rope_kwargs,
    )


def _rope_kwargs(rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
  """Maps a transformers `rope_scaling` dict onto `DecoderConfig` fields."""
  if not rope_scaling:
    return {}
  rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
  if rope_type == "default":
    return {}
  if rope_type == "linear":
    return {"rope_type": "linear", "rope_factor": float(rope_scaling["factor"])}
  if rope_type == "llama3":
    return {
        "rope_type": "llama3",
        "rope_factor": float(rope_scaling["factor"]),
        "rope_low_freq_factor": float(rope_scaling["low_freq_factor"]),
        "rope_high_freq_factor": float(rope_scaling["high_freq_factor"]),
        "rope_original_max_position": int(rope_scaling["original_max_position_embeddings"]),
    }
  raise NotImplementedError(f"rope_scaling type {rope_type!r}")


def rope_inverse_frequencies(config: DecoderConfig) -> np.ndarray:
  """Per-pair rotation frequencies [H/2], as transformers computes them (in float64 here)."""
  exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
  inv_freq = 1.0 / (config.rope_theta**exponents)
  if config.rope_type == "linear":
    inv_freq = inv_freq / config.rope_factor
  elif config.rope_type == "llama3":
    # Llama-3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    # blend in between (transformers `_compute_llama3_parameters`).
    low_freq_wavelen = config.rope_original_max_position / config.rope_low_freq_factor
    high_freq_wavelen = config.rope_original_max_position / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / config.rope_factor, inv_freq)
    smooth = ((config.rope_original_max_position / wavelen - config.rope_low_freq_factor) /
              (config.rope_high_freq_factor - config.rope_low_freq_factor))
    smoothed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled)
  elif config.rope_type != "default":
    raise NotImplementedError(f"rope_type {config.rope_type!r}")
  return inv_freq


def rope_tables(config: DecoderConfig, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """cos/sin tables [L, H] for positions 0..L-1 in the half-split layout HF checkpoints use.

  Built with numpy at trace time: the sequence length is static under jit, so the tables
  become small constants instead of a max_position_embeddings-sized buffer.
  """
  positions_L = np.arange(seq_len, dtype=np.float64)
  angles_LxHhalf = positions_L[:, None] * rope_inverse_frequencies(config)[None, :]
  angles_LxH = np.concatenate([angles_LxHhalf, angles_LxHhalf], axis=-1)
  return np.cos(angles_LxH).astype(np.float32), np.sin(angles_LxH).astype(np.float32)


def apply_rope(x_BxLxNxH: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array) -> jax.Array:
  """Rotates pairs (i, i + H/2): transformers' `rotate_half` convention.

  llama.cpp's GGUF files store q/k permuted for interleaved pairs; the GGUF reader undoes
  that permutation, so this single convention serves every checkpoint source.
  """
  half = x_BxLxNxH.shape[-1] // 2
  x1, x2 = x_BxLxNxH[..., :half], x_BxLxNxH[..., half:]
  rotated_BxLxNxH = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos_LxH[None, :, None, :].astype(x_BxLxNxH.dtype)
  sin = sin_LxH[None, :, None, :].astype(x_BxLxNxH.dtype)
  return x_BxLxNxH * cos + rotated_BxLxNxH * sin


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE."""
  config: DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array,
               key_mask_Bx1x1xL: jax.Array) -> jax.Array:
    cfg = self.config
    batch, seq_len, _ = x_BxLxD.shape
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    q_BxLxNxH = dense(cfg.num_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="q_proj")(
        x_BxLxD).reshape(batch, seq_len, cfg.num_heads, cfg.head_dim)
    k_BxLxKxH = dense(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="k_proj")(
        x_BxLxD).reshape(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
    v_BxLxKxH = dense(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, name="v_proj")(
        x_BxLxD).reshape(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q_BxLxNxH = nn.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="q_norm")(q_BxLxNxH)
      k_BxLxKxH = nn.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="k_norm")(k_BxLxKxH)
    q_BxLxNxH = apply_rope(q_BxLxNxH, cos_LxH, sin_LxH)
    k_BxLxKxH = apply_rope(k_BxLxKxH, cos_LxH, sin_LxH)
    # jax's attention: handles GQA (N a multiple of K) without repeating k/v and does the
    # softmax in float32. Its default implementation is XLA's on every backend; the
    # boolean key mask keeps any padding layout valid.
    window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    out_BxLxNxH = jax.nn.dot_product_attention(
        q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=key_mask_Bx1x1xL, is_causal=True,
        scale=cfg.head_dim**-0.5, local_window_size=window)
    out_BxLxNH = out_BxLxNxH.reshape(batch, seq_len, cfg.num_heads * cfg.head_dim)
    return dense(cfg.hidden_size, use_bias=cfg.o_bias, name="o_proj")(out_BxLxNH)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""
  config: DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cfg = self.config
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              use_bias=cfg.mlp_bias)
    gate_BxLxF = dense(cfg.intermediate_size, name="gate_proj")(x_BxLxD)
    up_BxLxF = dense(cfg.intermediate_size, name="up_proj")(x_BxLxD)
    return dense(cfg.hidden_size, name="down_proj")(nn.silu(gate_BxLxF) * up_BxLxF)


class DecoderBlock(nn.Module):
  """Pre-norm transformer block."""
  config: DecoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, cos_LxH: jax.Array, sin_LxH: jax.Array,
               key_mask_Bx1x1xL: jax.Array) -> jax.Array:
    cfg = self.config
    norm = functools.partial(nn.RMSNorm, cfg.rms_norm_eps, dtype=self.dtype)
    x_BxLxD = x_BxLxD + Attention(cfg, self.dtype, name="self_attn")(
        norm(name="input_layernorm")(x_BxLxD), cos_LxH, sin_LxH, key_mask_Bx1x1xL)
    return x_BxLxD + SwiGLU(cfg, self.dtype, name="mlp")(
        norm(name="post_attention_layernorm")(x_BxLxD))


class DecoderLM(nn.Module):
  """Token ids -> final-norm hidden states (transformers' `LlamaModel.last_hidden_state`).

  No LM head: a text encoder only needs hidden states, and leaving it out saves the
  vocab x width matrix for untied models.

  Attributes:
    config: the architecture.
    dtype: computation dtype (parameters stay float32; e.g. jnp.bfloat16 for speed).
    remat: rematerialise each block in the backward pass (only useful when fine-tuning;
      a frozen encoder has no backward pass through it).
  """
  config: DecoderConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
    cfg = self.config
    x_BxLxD = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                       param_dtype=jnp.float32, name="embed_tokens")(input_ids_BxL)
    # Positions are 0..L-1 for every row, as in transformers without explicit position_ids:
    # right padding keeps real tokens at the same positions as unpadded text.
    cos_LxH, sin_LxH = rope_tables(cfg, input_ids_BxL.shape[1])
    # Padding keys are masked; causality comes from `is_causal` inside attention. Padded
    # query rows still see the real tokens before them, so no row is fully masked.
    key_mask_Bx1x1xL = attention_mask_BxL.astype(bool)[:, None, None, :]
    block_cls = nn.remat(DecoderBlock) if self.remat else DecoderBlock
    # A Python loop (not nn.scan) keeps one parameter subtree per layer, named after the
    # checkpoint's layers.N; compile time stays acceptable for ~30-layer models.
    for i in range(cfg.num_layers):
      x_BxLxD = block_cls(cfg, self.dtype, name=f"layers_{i}")(
          x_BxLxD, cos_LxH, sin_LxH, key_mask_Bx1x1xL)
    return nn.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, name="norm")(x_BxLxD)
