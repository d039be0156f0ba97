"""vlpre's one decoder LLM: Llama / Mistral / Qwen2 / Qwen3 checkpoints, for every use.

One Flax Linen module serves each way vlpre uses a decoder:
- encoding (LIFT's frozen text embedder): token ids → hidden states, any layer;
- training (LCL, HIVE, bridge training, LM fine-tuning): gradients through it, an LM head
  (tied or untied) for a next-token loss, remat policies, layers scanned with stacked
  parameters so compile time does not grow with depth;
- generation (describe, captioning evaluators): a functional KV cache (`init_cache`),
  prefill and one-token steps; see `vlpre.llm.generate`;
- multimodal seams: input embeddings (image tokens interleaved at given positions),
  explicit positions and segment ids (packed documents never attend to each other),
  causal or bidirectional attention, and per-layer extra keys/values supplied by the
  caller (cross-attention into chosen layers).

Why vlpre has its own decoder: transformers 5 has no Flax models at all, and 4.x's
`FlaxLlamaModel` built its RoPE tables with base 10000 whatever `config.rope_theta` said
(wrong hidden states for SmolLM2, theta 1e5), materialised a `max_position_embeddings`²
causal mask, and had no Qwen2/3 class.

Parameters follow the Hugging Face checkpoint names (`layers.3.self_attn.q_proj.weight`
becomes `.../self_attn/q_proj/kernel`, transposed) and carry logical axis names (embed,
heads_fused, kv_heads_fused, mlp, vocab, norm; `layers` for the stacked axis; see
vlpre.sharding), so loading is a mechanical
rename (`vlpre.llm.checkpoints.state_dict_to_params`) and sharding follows the trainer's
rules. Layer parameters are named after the layers they hold:
  scan=False                  layers_0, layers_1, ...           (one subtree per layer)
  scan=True                   layers                            (stacked [L, ...])
  scan=True, layer_groups=(4, 26)   layers_0to3, layers_4to29   (one stack per group)
so a regex freezes "the first N" or "the last N" layers when N is a group boundary
(e.g. `llm/layers_0to3/.*`).

Shape letters (docs/adding_a_method.md#glossary): B batch, L sequence length, T new tokens of a
cache step, S key slots (cache or extra keys), D model width, H query heads, G key/value
heads (H a multiple of G), K per-head dim, F MLP width, V vocabulary.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlpre.llm import rope
from vlpre.llm.config import DecoderConfig
from vlpre.nn import attention as attention_lib
from vlpre.nn import lora as lora_lib
from vlpre.nn import stack as stack_lib

@flax.struct.dataclass
class ExtraKV:
  """Keys/values a caller adds to one layer's attention (cross-attention hook).

  Every query of the layer may attend to them (no causality), next to its own keys.
  Attributes:
    k_BxSxGxK, v_BxSxGxK: already projected into the layer's key/value heads.
    mask_BxS: which of the S extra slots are real (False: padding / no image).
    positions_BxS: if given, the decoder's own 1D RoPE is applied to the keys at these
      positions; None leaves them as given (e.g. rotated by the caller's 2D RoPE).
    q_norm_scale_BxK: if given, QK-norm for these keys: the queries that score them are
      RMS-normalised per head (before RoPE) and scaled by this gain (the caller normalises
      its keys); the layer's own keys are still scored with its usual queries.
  """
  k_BxSxGxK: jax.Array
  v_BxSxGxK: jax.Array
  mask_BxS: jax.Array
  positions_BxS: jax.Array | None = None
  q_norm_scale_BxK: jax.Array | None = None


@flax.struct.dataclass
class DecoderOutput:
  """hidden: the final (normed, unless `final_norm=False`) states [B, L, D];
  logits: [B, L, V] float32, or [B, 1, V] for return_logits="last", or None;
  cache: the updated KV cache in decode mode, else None;
  all_hidden: [layers + 1, B, L, D] (embeddings, then after each block; the last entry
    before the final norm), only with return_all_hidden=True."""
  hidden: jax.Array
  logits: jax.Array | None = None
  cache: Any = None
  all_hidden: jax.Array | None = None


def _dense(features: int, names: tuple[str, str], use_bias: bool, dtype, name: str,
           lora: tuple[int, float] = (0, 0.0)):
  """A projection; with `lora` = (rank > 0, alpha) a low-rank adapted one (vlpre.nn.lora)."""
  rank, alpha = lora
  if rank:
    return lora_lib.LoRADense(features, rank, alpha, names, use_bias=use_bias, dtype=dtype,
                              name=name)
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))


def _rms_norm(eps: float, dtype, name: str):
  return nn.RMSNorm(eps, dtype=dtype, param_dtype=jnp.float32, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, in float32 (RMSNorm without its gain)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class Attention(nn.Module):
  """Grouped-query attention with RoPE, optional KV cache and extra keys/values;
  `implementation` is one of vlpre.nn.attention.IMPLEMENTATIONS (Decoder.attention)."""
  config: DecoderConfig
  dtype: Any = jnp.float32
  implementation: str = "dot_product_attention"
  lora: tuple[int, float] = (0, 0.0)  # (rank, alpha) of adapters on q/k/v/o; rank 0: none

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache_kv=None, cache_index=None,
               extra: ExtraKV | None = None):
    cfg = self.config
    batch, steps, _ = x_BxTxD.shape
    q_BxTxHxK = _dense(cfg.num_heads * cfg.head_dim, ("embed", "heads_fused"), cfg.qkv_bias,
                       self.dtype, "q_proj", self.lora)(x_BxTxD).reshape(
                           batch, steps, cfg.num_heads, -1)
    k_BxTxGxK = _dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads_fused"), cfg.qkv_bias,
                       self.dtype, "k_proj", self.lora)(x_BxTxD).reshape(
                           batch, steps, cfg.num_kv_heads, -1)
    v_BxTxGxK = _dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads_fused"), cfg.qkv_bias,
                       self.dtype, "v_proj", self.lora)(x_BxTxD).reshape(
                           batch, steps, cfg.num_kv_heads, -1)
    if cfg.qk_norm:
      q_BxTxHxK = _rms_norm(cfg.rms_norm_eps, self.dtype, "q_norm")(q_BxTxHxK)
      k_BxTxGxK = _rms_norm(cfg.rms_norm_eps, self.dtype, "k_norm")(k_BxTxGxK)
    inv_freq = cfg.inverse_frequencies()
    q_extra_BxTxHxK = None
    if extra is not None and extra.q_norm_scale_BxK is not None:
      q_extra_BxTxHxK = (rms_normalize(q_BxTxHxK, cfg.rms_norm_eps) *
                         extra.q_norm_scale_BxK[:, None, None, :]).astype(self.dtype)
    q_BxTxHxK = rope.apply_rope(q_BxTxHxK, positions_BxT, inv_freq)
    k_BxTxGxK = rope.apply_rope(k_BxTxGxK, positions_BxT, inv_freq)
    new_cache = None
    if cache_kv is not None:  # write the new keys at their slots, attend over all slots.
      cache_k_BxSxGxK, cache_v_BxSxGxK = cache_kv
      cache_k_BxSxGxK = jax.lax.dynamic_update_slice(
          cache_k_BxSxGxK, k_BxTxGxK.astype(cache_k_BxSxGxK.dtype), (0, cache_index, 0, 0))
      cache_v_BxSxGxK = jax.lax.dynamic_update_slice(
          cache_v_BxSxGxK, v_BxTxGxK.astype(cache_v_BxSxGxK.dtype), (0, cache_index, 0, 0))
      new_cache = (cache_k_BxSxGxK, cache_v_BxSxGxK)
      k_BxSxGxK = cache_k_BxSxGxK.astype(self.dtype)
      v_BxSxGxK = cache_v_BxSxGxK.astype(self.dtype)
    else:
      k_BxSxGxK, v_BxSxGxK = k_BxTxGxK, v_BxTxGxK
    extra_k_BxExGxK = extra_v_BxExGxK = extra_mask_BxE = None
    if extra is not None:
      extra_k_BxExGxK = extra.k_BxSxGxK.astype(self.dtype)
      if extra.positions_BxS is not None:
        extra_k_BxExGxK = rope.apply_rope(extra_k_BxExGxK, extra.positions_BxS, inv_freq)
      extra_v_BxExGxK = extra.v_BxSxGxK.astype(self.dtype)
      extra_mask_BxE = extra.mask_BxS
    # The boolean mask carries causality, segments and padding.
    out_BxTxHxK = attention_lib.attention(
        q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, extra_k_BxExGxK=extra_k_BxExGxK,
        extra_v_BxExGxK=extra_v_BxExGxK, extra_mask_BxE=extra_mask_BxE,
        extra_q_BxTxHxK=q_extra_BxTxHxK, scale=cfg.head_dim**-0.5,
        implementation=self.implementation)
    out_BxTxHxK = nn.with_logical_constraint(out_BxTxHxK, ("batch", "length", "act_heads", None))
    out_BxTxD = _dense(cfg.hidden_size, ("heads_fused", "embed"), cfg.o_bias, self.dtype, "o_proj",
                        self.lora)(
        out_BxTxHxK.reshape(batch, steps, cfg.num_heads * cfg.head_dim))
    return out_BxTxD, new_cache


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""
  config: DecoderConfig
  dtype: Any = jnp.float32
  lora: tuple[int, float] = (0, 0.0)  # (rank, alpha) of adapters on gate/up/down; 0: none

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    gate_BxTxF = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, self.dtype,
                        "gate_proj", self.lora)(x_BxTxD)
    up_BxTxF = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, self.dtype,
                      "up_proj", self.lora)(x_BxTxD)
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate_BxTxF) * up_BxTxF,
                                         ("batch", "length", "act_mlp"))
    return _dense(cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, self.dtype, "down_proj",
                  self.lora)(h_BxTxF)


class DecoderBlock(nn.Module):
  """Pre-norm block, `(x, positions, mask, cache_index, layer_inputs) -> (x, ys)`
  (vlpre.nn.stack).

  layer_inputs: ((cache (k, v) or None, ExtraKV or None), drop-path rate) for this layer;
  ys: (new cache or None, the block's output if collecting hidden states).
  Drop-path (stochastic depth, vlpre.nn.stack.drop_path) is off when `deterministic`.
  """
  config: DecoderConfig
  dtype: Any = jnp.float32
  collect_hidden: bool = False
  deterministic: bool = True
  attention: str = "dot_product_attention"
  lora: tuple[int, float] = (0, 0.0)  # (rank, alpha) of adapters on every projection

  def _drop_path(self, branch_BxTxD, rate):
    if self.deterministic:
      return branch_BxTxD
    return stack_lib.drop_path(branch_BxTxD, rate, self.make_rng("dropout"))

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache_index, layer_inputs):
    cfg = self.config
    (cache_kv, extra), drop_rate = layer_inputs
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "act_embed"))
    h_BxTxD, new_cache = Attention(cfg, self.dtype, self.attention, self.lora, name="self_attn")(
        _rms_norm(cfg.rms_norm_eps, self.dtype, "input_layernorm")(x_BxTxD), positions_BxT,
        mask_Bx1xTxS, cache_kv, cache_index, extra)
    x_BxTxD = x_BxTxD + self._drop_path(h_BxTxD, drop_rate)
    x_BxTxD = x_BxTxD + self._drop_path(SwiGLU(cfg, self.dtype, self.lora, name="mlp")(
        _rms_norm(cfg.rms_norm_eps, self.dtype, "post_attention_layernorm")(x_BxTxD)), drop_rate)
    return x_BxTxD, (new_cache, x_BxTxD if self.collect_hidden else None)


def init_cache(config: DecoderConfig, batch: int, slots: int, *, scan: bool = True,
               groups: tuple[int, ...] = (), dtype=jnp.float32) -> dict:
  """An empty KV cache of `slots` positions for `Decoder(..., scan, layer_groups=groups)`.

  A plain pytree (jit it, donate it, reorder its batch rows for beam search):
    groups       per layer group, (k, v) stacked over the group's layers [n, B, S, K, H]
    segment_ids  [B, S] of the tokens written so far (0: empty or padding)
    positions    [B, S] their RoPE positions (for sliding windows)
    index        the next slot to write
  """
  shape = (batch, slots, config.num_kv_heads, config.head_dim)
  kv = []
  for _, _, count, _ in stack_lib.layer_groups(config.num_layers, scan, groups):
    kv.append((jnp.zeros((count, *shape), dtype), jnp.zeros((count, *shape), dtype)))
  return {"groups": tuple(kv), "segment_ids": jnp.zeros((batch, slots), jnp.int32),
          "positions": jnp.zeros((batch, slots), jnp.int32), "index": jnp.zeros((), jnp.int32)}


class Decoder(nn.Module):
  """The decoder: tokens and/or embeddings in; hidden states, logits and cache out.

  Attributes:
    config: the architecture.
    dtype: computation dtype (parameters stay float32; e.g. jnp.bfloat16 for speed).
    causal: causal attention as pretrained; False makes it bidirectional (bridge training).
    scan: scan the layers with stacked parameters (compile time flat in depth); False
      unrolls a Python loop with one parameter subtree per layer.
    layer_groups: sizes of consecutively scanned groups (with scan), e.g. (4, 26) so the
      first 4 layers can be frozen by a regex on their own subtree.
    remat: a key of vlpre.nn.stack.REMAT_POLICIES (training memory vs recompute).
    final_norm: apply the final RMSNorm (False: the raw residual stream, e.g. a text
      embedding pooled from an intermediate layer on a truncated config).
    drop_path: stochastic depth of the last layer (rates rise linearly from 0 at the
      first), applied when called with `deterministic=False` (rng "dropout").
    unroll: layers per iteration of a scanned group's loop (vlpre.nn.stack.resolve_unroll).
    attention: the attention implementation (vlpre.nn.attention.IMPLEMENTATIONS).
    lora_rank, lora_alpha: low-rank adapters on the projections (below).
  """
  config: DecoderConfig
  dtype: Any = jnp.float32
  causal: bool = True
  scan: bool = True
  layer_groups: tuple[int, ...] = ()
  remat: str = "none"
  final_norm: bool = True
  drop_path: float = 0.0
  unroll: int | bool | None = 1
  # XLA's dot_product_attention, the decoder's numerics against the HF checkpoints since
  # it was written ("auto" would pick einsum on CPU: equal up to float32 rounding).
  attention: str = "dot_product_attention"
  # Low-rank adapters on every attention and MLP projection (vlpre.nn.lora): rank 0 is
  # none; `lora.merge(params, lora_alpha)` folds them in for a plain (rank 0) decoder.
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array | None = None, segment_ids_BxL: jax.Array | None = None,
               *, embeddings_BxLxD: jax.Array | None = None,
               embeddings_mask_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None,
               extra_kv: Mapping[int, ExtraKV] | None = None, cache: dict | None = None,
               return_logits: bool | str = False,
               return_all_hidden: bool = False, deterministic: bool = True) -> DecoderOutput:
    """Runs the decoder.

    Args:
      tokens_BxL: token ids (optional when embeddings cover every position).
      segment_ids_BxL: document id per token, 0 = padding; queries only see keys of
        their own document (packed sequences). A 0/1 attention mask is a valid value.
        Default: all ones.
      embeddings_BxLxD: input embeddings, e.g. projected image tokens.
      embeddings_mask_BxL: where the embeddings replace the token embeddings (needed
        when both tokens and embeddings are given; default: everywhere).
      positions_BxL: RoPE positions. Default: 0..L-1 (decode mode: continuing from the
        cache index).
      extra_kv: {layer index: ExtraKV} keys/values added to those layers' attention.
      cache: from `init_cache` (decode mode): the L new tokens are written at slots
        cache["index"].., attend to everything written before, and the updated cache
        is returned.
      return_logits: True for [B, L, V] logits, "last" for the last position only.
      return_all_hidden: also return every layer's output (text-embedding layer sweeps).
      deterministic: False turns drop-path on (training).
    """
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                     name="embed_tokens", embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), ("vocab", "embed")))
    if tokens_BxL is None and embeddings_BxLxD is None:
      raise ValueError("the decoder needs tokens_BxL, embeddings_BxLxD or both")
    if tokens_BxL is not None:
      x_BxLxD = embed(tokens_BxL)
      if embeddings_BxLxD is not None:
        where_BxL = (jnp.ones(tokens_BxL.shape, bool) if embeddings_mask_BxL is None
                     else embeddings_mask_BxL.astype(bool))
        x_BxLxD = jnp.where(where_BxL[..., None], embeddings_BxLxD.astype(self.dtype), x_BxLxD)
    else:
      x_BxLxD = embeddings_BxLxD.astype(self.dtype)
    batch, length = x_BxLxD.shape[:2]
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)

    if cache is None:
      slots_L = jnp.arange(length)
      if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(slots_L, (batch, length))
      positions_BxL = positions_BxL.astype(jnp.int32)
      cache_index = None
      mask_Bx1xLxS = attention_lib.segment_mask(
          segment_ids_BxL, slots_L, positions_BxL, segment_ids_BxL, slots_L, positions_BxL,
          causal=self.causal, window=cfg.sliding_window)
      group_caches = [None] * len(stack_lib.layer_groups(cfg.num_layers, self.scan,
                                                         self.layer_groups))
    else:
      cache_index = cache["index"]
      slots_L = cache_index + jnp.arange(length)
      if positions_BxL is None:
        positions_BxL = jnp.broadcast_to(slots_L, (batch, length))
      positions_BxL = positions_BxL.astype(jnp.int32)
      cache_segments_BxS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BxL,
                                                        (0, cache_index))
      cache_positions_BxS = jax.lax.dynamic_update_slice(cache["positions"], positions_BxL,
                                                         (0, cache_index))
      mask_Bx1xLxS = attention_lib.segment_mask(
          segment_ids_BxL, slots_L, positions_BxL, cache_segments_BxS,
          jnp.arange(cache_segments_BxS.shape[1]), cache_positions_BxS, causal=self.causal,
          window=cfg.sliding_window)
      group_caches = list(cache["groups"])

    def group_inputs(group, first, count):
      return group_caches[group], _stack_extra(extra_kv, first, count)

    embeddings_BxLxD = x_BxLxD
    x_BxLxD, group_outputs = stack_lib.stack(
        DecoderBlock, dict(config=cfg, dtype=self.dtype, collect_hidden=return_all_hidden,
                           deterministic=deterministic, attention=self.attention,
                           lora=(self.lora_rank, self.lora_alpha)),
        x_BxLxD, positions_BxL, mask_Bx1xLxS, cache_index, depth=cfg.num_layers, scan=self.scan,
        groups=self.layer_groups, remat=self.remat, unroll=self.unroll,
        drop_path_rate=self.drop_path, group_inputs=group_inputs)
    new_group_caches = [new_kv for new_kv, _ in group_outputs]
    all_hidden = None
    if return_all_hidden:
      all_hidden = jnp.concatenate([embeddings_BxLxD[None]] + [h for _, h in group_outputs])

    if self.final_norm:
      x_BxLxD = _rms_norm(cfg.rms_norm_eps, self.dtype, "norm")(x_BxLxD)
    logits = None
    if return_logits:
      head_in = x_BxLxD[:, -1:] if return_logits == "last" else x_BxLxD
      if cfg.tie_word_embeddings:
        logits = embed.attend(head_in)
      else:
        logits = _dense(cfg.vocab_size, ("embed", "vocab"), False, self.dtype, "lm_head")(head_in)
      logits = logits.astype(jnp.float32)
    new_cache = None
    if cache is not None:
      new_cache = {"groups": tuple(new_group_caches), "segment_ids": cache_segments_BxS,
                   "positions": cache_positions_BxS, "index": cache_index + length}
    return DecoderOutput(hidden=x_BxLxD, logits=logits, cache=new_cache,
                         all_hidden=all_hidden)


def _stack_extra(extra_kv: Mapping[int, ExtraKV] | None, first: int,
                 count: int) -> ExtraKV | None:
  """The group's extra K/V stacked over its layers [n, ...]; layers without get masked zeros.

  A scanned group runs one program for all its layers, so a layer without extra keys
  attends over masked zero slots: exact (masked keys get zero weight), at the cost of
  attending over S more keys in that layer.
  """
  if not extra_kv:
    return None
  present = {i: e for i, e in extra_kv.items() if first <= i < first + count}
  if not present:
    return None
  template = next(iter(present.values()))
  for field in ("positions_BxS", "q_norm_scale_BxK"):
    given = [getattr(e, field) is not None for e in present.values()]
    if any(given) and not all(given):
      raise ValueError(f"within one layer group, give {field} for every ExtraKV or none")

  def pick(i, field):
    e = present.get(i)
    ref = getattr(template, field)
    if ref is None:
      return None
    return getattr(e, field) if e is not None else jnp.zeros_like(ref)

  layers = range(first, first + count)
  return ExtraKV(
      k_BxSxGxK=jnp.stack([pick(i, "k_BxSxGxK") for i in layers]),
      v_BxSxGxK=jnp.stack([pick(i, "v_BxSxGxK") for i in layers]),
      mask_BxS=jnp.stack([pick(i, "mask_BxS").astype(bool) for i in layers]),
      positions_BxS=(jnp.stack([pick(i, "positions_BxS") for i in layers])
                     if template.positions_BxS is not None else None),
      q_norm_scale_BxK=(jnp.stack([pick(i, "q_norm_scale_BxK") for i in layers])
                        if template.q_norm_scale_BxK is not None else None))
