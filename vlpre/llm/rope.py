"""Rotary position embedding (RoPE): the one implementation in vlpre.

Frequencies follow transformers' `ROPE_INIT_FUNCTIONS` ("default", "linear", "llama3");
rotation uses the half-split layout of Hugging Face checkpoints (`rotate_half`: pairs
(i, i + K/2)). llama.cpp's GGUF files store q/k permuted for interleaved pairs; the GGUF
reader undoes that, so this single convention serves every checkpoint source.

Positions are explicit arrays, so one function serves right-padded batches, left-padded
prompts, packed documents (positions restart per document) and the KV-cache decode step.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                        factor: float = 1.0, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0,
                        original_max_position: int = 8192) -> np.ndarray:
  """Per-pair rotation frequencies [K/2] (float64, as transformers computes them)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  inv_freq = 1.0 / (theta**exponents)
  if rope_type == "linear":
    inv_freq = inv_freq / factor
  elif rope_type == "llama3":
    # Llama-3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth
    # blend in between (transformers `_compute_llama3_parameters`).
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = ((original_max_position / wavelen - low_freq_factor) /
              (high_freq_factor - low_freq_factor))
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled)
  elif rope_type != "default":
    raise NotImplementedError(f"rope_type {rope_type!r}")
  return inv_freq


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array,
               inv_freq_Khalf: np.ndarray) -> jax.Array:
  """Rotates each head's pairs (i, i + K/2) by position × frequency (K: per-head dim).

  Args:
    x_BxLxHxK: queries or keys.
    positions_BxL: integer (or float) positions of each token.
    inv_freq_Khalf: from `inverse_frequencies`.
  """
  angles_BxLxKhalf = (positions_BxL[..., None].astype(jnp.float32) *
                      jnp.asarray(inv_freq_Khalf, jnp.float32))
  angles_BxLx1xH = jnp.concatenate([angles_BxLxKhalf, angles_BxLxKhalf], axis=-1)[:, :, None]
  cos, sin = jnp.cos(angles_BxLx1xH), jnp.sin(angles_BxLx1xH)
  half = x_BxLxHxK.shape[-1] // 2
  rotated_BxLxHxK = jnp.concatenate([-x_BxLxHxK[..., half:], x_BxLxHxK[..., :half]], axis=-1)
  return x_BxLxHxK * cos.astype(x_BxLxHxK.dtype) + rotated_BxLxHxK * sin.astype(x_BxLxHxK.dtype)


def grid_positions(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and column [N] of each patch of a height × width grid, in row-major order."""
  rows_HxW, cols_HxW = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return rows_HxW.reshape(-1), cols_HxW.reshape(-1)


def apply_rope_2d(x_BxNxHxK: jax.Array, rows_BxN: jax.Array, cols_BxN: jax.Array,
                  theta: float = 10_000.0) -> jax.Array:
  """2D RoPE for image patches: the first half of each head rotates by row, the second by column.

  Each half is ordinary (half-split) RoPE of dimension K/2 at its own coordinate, so the
  score of two rotated vectors depends on their row and column offsets only.
  """
  half = x_BxNxHxK.shape[-1] // 2
  if half % 2:
    raise ValueError(f"2D RoPE needs a per-head dim divisible by 4, got {x_BxNxHxK.shape[-1]}")
  inv_freq = inverse_frequencies(half, theta)
  return jnp.concatenate([apply_rope(x_BxNxHxK[..., :half], rows_BxN, inv_freq),
                          apply_rope(x_BxNxHxK[..., half:], cols_BxN, inv_freq)], axis=-1)
