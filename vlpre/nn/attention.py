"""vlpre's one attention op, used by every tower (ViT, text tower, MAP head, the LLM).

softmax(q·kᵀ·scale + mask) · v with grouped key/value heads (query head h reads key head
h // (H / G)), causal or bidirectional, a boolean mask, and optional extra keys/values
that every query sees next to its own keys (the LLM's cross-attention hook: HIVE's image
keys), scored by the same queries or by a second query set.

Shape letters (docs/adding_a_method.md#glossary): B batch, T queries, S keys, E extra keys, H query
heads, G key/value heads (G divides H), R = H / G query heads per key head, K per-head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlpre.nn import platform

# `implementation=` of `attention` (and of every tower's `attention` attribute):
#   "einsum": heads-major einsum → float32 softmax → einsum, which XLA:CPU runs faster
#     (bench/README.md "Where the step time goes");
#   "dot_product_attention": jax.nn.dot_product_attention, XLA's implementation;
#   "cudnn": jax.nn.dot_product_attention(implementation="cudnn"), cuDNN's fused kernel
#     (GPU only; cuDNN supports a subset of shapes and dtypes, e.g. float16/bfloat16);
#   "auto": "einsum" on CPU, "dot_product_attention" on GPU/TPU.
IMPLEMENTATIONS = ("auto", "einsum", "dot_product_attention", "cudnn")


def resolve_implementation(implementation: str) -> str:
  """The implementation "auto" stands for on the backend the program is for
  (`vlpre.nn.platform`); a ValueError for a bad name."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention {implementation!r} not in {IMPLEMENTATIONS}")
  backend = platform.backend()
  if implementation == "cudnn" and backend != "gpu":
    raise ValueError(f"attention 'cudnn' runs on GPU only, not on this {backend} backend")
  if implementation == "auto":
    return "einsum" if backend == "cpu" else "dot_product_attention"
  return implementation


def padding_mask(keep_BxS: jax.Array) -> jax.Array:
  """[B, 1, 1, S]: every query sees the keys where `keep` (key padding mask)."""
  return keep_BxS.astype(bool)[:, None, None, :]


def segment_mask(q_segment_BxT: jax.Array, q_slot_T: jax.Array, q_position_BxT: jax.Array,
                 k_segment_BxS: jax.Array, k_slot_S: jax.Array, k_position_BxS: jax.Array,
                 *, causal: bool, window: int | None) -> jax.Array:
  """[B, 1, T, S]: which keys each query sees: same segment; causal by slot; in the window.

  Segment id 0 marks padding / empty cache slots: a real query (id > 0) never sees one.
  Padding queries see padding keys, so no row is empty (their outputs are ignored).
  """
  mask_BxTxS = q_segment_BxT[:, :, None] == k_segment_BxS[:, None, :]
  if causal:
    mask_BxTxS &= (k_slot_S[None, :] <= q_slot_T[:, None])[None]
  if window is not None:
    mask_BxTxS &= (q_position_BxT[:, :, None] - k_position_BxS[:, None, :]) < window
  return mask_BxTxS[:, None]


def attention(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
              mask: jax.Array | None = None, *, causal: bool = False,
              extra_k_BxExGxK: jax.Array | None = None,
              extra_v_BxExGxK: jax.Array | None = None,
              extra_mask_BxE: jax.Array | None = None,
              extra_q_BxTxHxK: jax.Array | None = None,
              scale: float | None = None, implementation: str = "auto") -> jax.Array:
  """Masked multi-head attention, [B, T, H, K]; every implementation computes the same.

  Args:
    q_BxTxHxK, k_BxSxGxK, v_BxSxGxK: queries and the layer's own keys/values.
    mask: boolean, broadcastable to [B, H, T, S], True = attend (`padding_mask`,
      `segment_mask` build it).
    causal: query t sees own key s only if s <= t + S - T (queries are the last T).
    extra_k_BxExGxK, extra_v_BxExGxK: keys/values appended after the own keys; every
      query may attend to them (no causality).
    extra_mask_BxE: which extra keys are real (default: all).
    extra_q_BxTxHxK: if given, the queries that score the extra keys (e.g. QK-normed
      for QK-normed extra keys); the own keys are still scored by `q`.
    scale: of the logits; default 1/√K.
    implementation: one of IMPLEMENTATIONS.
  """
  implementation = resolve_implementation(implementation)
  if mask is not None and mask.ndim != 4:
    raise ValueError(f"attention mask must be 4-D, broadcastable to [B, H, T, S]; got {mask.shape}")
  batch, steps, _, dim = q_BxTxHxK.shape
  slots = k_BxSxGxK.shape[1]
  scale = dim**-0.5 if scale is None else scale
  if extra_k_BxExGxK is None:
    if implementation != "einsum" and (not causal or steps == slots):
      return _fused(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, causal, scale, implementation)
    return _masked(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, _own_mask(mask, causal, steps, slots),
                   scale, implementation)
  extras = extra_k_BxExGxK.shape[1]
  own_BxHxTxS = _own_mask(mask, causal, steps, slots)
  if own_BxHxTxS is None:
    own_BxHxTxS = jnp.ones((1, 1, steps, slots), bool)
  if extra_mask_BxE is None:
    extra_mask_BxE = jnp.ones((batch, extras), bool)
  heads = own_BxHxTxS.shape[1]
  own_BxHxTxS = jnp.broadcast_to(own_BxHxTxS, (batch, heads, steps, slots))
  extra_BxHxTxE = jnp.broadcast_to(padding_mask(extra_mask_BxE), (batch, heads, steps, extras))
  mask_BxHxTxS = jnp.concatenate([own_BxHxTxS, extra_BxHxTxE], axis=-1)
  v_BxSxGxK = jnp.concatenate([v_BxSxGxK, extra_v_BxExGxK.astype(v_BxSxGxK.dtype)], axis=1)
  if extra_q_BxTxHxK is None:
    k_BxSxGxK = jnp.concatenate([k_BxSxGxK, extra_k_BxExGxK.astype(k_BxSxGxK.dtype)], axis=1)
    return _masked(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxHxTxS, scale, implementation)
  # Two query sets as one: q' = [q, q_extra] and k' = [[k, 0], [0, k_extra]] along the
  # head dim give q'·k' = q·k on the own keys and q_extra·k_extra on the extra ones.
  zeros_own = jnp.zeros_like(k_BxSxGxK)
  zeros_extra = jnp.zeros_like(extra_k_BxExGxK, dtype=k_BxSxGxK.dtype)
  q_BxTxHx2K = jnp.concatenate([q_BxTxHxK, extra_q_BxTxHxK.astype(q_BxTxHxK.dtype)], axis=-1)
  k_BxSxGx2K = jnp.concatenate(
      [jnp.concatenate([k_BxSxGxK, zeros_own], axis=-1),
       jnp.concatenate([zeros_extra, extra_k_BxExGxK.astype(k_BxSxGxK.dtype)], axis=-1)], axis=1)
  if implementation == "einsum":
    return _masked(q_BxTxHx2K, k_BxSxGx2K, v_BxSxGxK, mask_BxHxTxS, scale, implementation)
  # jax's kernels want v's head dim equal to q's: pad v and drop the padding after.
  v_BxSxGx2K = jnp.concatenate([v_BxSxGxK, jnp.zeros_like(v_BxSxGxK)], axis=-1)
  out_BxTxHx2K = _masked(q_BxTxHx2K, k_BxSxGx2K, v_BxSxGx2K, mask_BxHxTxS, scale,
                         implementation)
  return out_BxTxHx2K[..., :dim]


def _own_mask(mask, causal, steps, slots):
  """The caller's mask and causality as one boolean mask (None: everything visible)."""
  if not causal:
    return None if mask is None else mask.astype(bool)
  causal_TxS = jnp.tril(jnp.ones((steps, slots), bool), k=slots - steps)
  return causal_TxS[None, None] if mask is None else (mask.astype(bool) & causal_TxS)


def _masked(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale, implementation):
  """Attention with causality already folded into the boolean mask."""
  if implementation == "einsum":
    return _einsum(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale)
  return _fused(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, False, scale, implementation)


def _fused(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, causal, scale, implementation):
  """jax.nn.dot_product_attention: it handles GQA without repeating k/v and does the
  softmax in float32."""
  return jax.nn.dot_product_attention(
      q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask, is_causal=causal, scale=scale,
      implementation="cudnn" if implementation == "cudnn" else None)


def _einsum(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask, scale):
  """Heads-major einsums (plain batched matmuls for XLA:CPU), float32 logits and softmax."""
  batch, steps, heads, dim = q_BxTxHxK.shape
  slots, groups = k_BxSxGxK.shape[1:3]
  per_group = heads // groups
  dtype = q_BxTxHxK.dtype
  q_BxGxRxTxK = q_BxTxHxK.reshape(batch, steps, groups, per_group, dim).transpose(0, 2, 3, 1, 4)
  k_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3)
  v_BxGxSxK = v_BxSxGxK.transpose(0, 2, 1, 3)
  logits_BxGxRxTxS = jnp.einsum("bgrtk,bgsk->bgrts", q_BxGxRxTxK * jnp.asarray(scale, dtype),
                                k_BxGxSxK, preferred_element_type=jnp.float32)
  if mask is not None:
    mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (1, 1, steps, slots)))
    mask_heads = mask.shape[1]
    mask = mask.reshape(mask.shape[0], *((groups, per_group) if mask_heads > 1 else (1, 1)),
                        steps, slots)
    logits_BxGxRxTxS = jnp.where(mask, logits_BxGxRxTxS, jnp.finfo(jnp.float32).min)
  probs_BxGxRxTxS = jax.nn.softmax(logits_BxGxRxTxS, axis=-1).astype(v_BxSxGxK.dtype)
  out_BxGxRxTxK = jnp.einsum("bgrts,bgsk->bgrtk", probs_BxGxRxTxS, v_BxGxSxK)
  return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(batch, steps, heads, -1)
