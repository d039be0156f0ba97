"""The architecture of a Llama-family decoder, read from a transformers config.

Covers Llama, Mistral, Qwen2 and Qwen3 by flags (q/k/v biases, Qwen3's per-head q/k
norms, Mistral's sliding window, RoPE scaling); `vlpre.llm.model.Decoder` runs it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vlpre.llm import rope

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
  tie_word_embeddings: bool = True  # LM head = embedding matrix (else its own lm_head)

  def inverse_frequencies(self) -> np.ndarray:
    """RoPE's per-pair frequencies for this architecture (vlpre.llm.rope)."""
    return rope.inverse_frequencies(
        self.head_dim, self.rope_theta, self.rope_type, self.rope_factor,
        self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_position)

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

    # transformers 5 keeps theta and the scaling in one `rope_parameters` dict (its
    # `rope_scaling` is an alias); 4.x has `rope_theta` beside an optional `rope_scaling`.
    rope_parameters = (getattr(hf_config, "rope_parameters", None)
                       or getattr(hf_config, "rope_scaling", None) or {})
    rope_theta = rope_parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_kwargs = _rope_kwargs(rope_parameters)
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
        rope_theta=float(rope_theta),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        **rope_kwargs,
    )


def _rope_kwargs(rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
  """Maps a transformers `rope_scaling` / `rope_parameters` dict onto `DecoderConfig` fields."""
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
