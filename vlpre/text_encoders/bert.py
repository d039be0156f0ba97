"""BERT encoders (MiniLM, sentence-transformers checkpoints) on vlpre's own Linen code.

    module, params = bert.load(source.hf_config, source.state_dict)
    hidden_BxLxD = module.apply({"params": params}, ids_BxL, mask_BxL)

The architecture of transformers' `BertModel` without its [CLS] pooler (sentence
embedders pool the token states themselves): word + position + token-type embeddings and
a LayerNorm, then post-LN blocks (attention, residual, LayerNorm; MLP with exact-erf GELU,
residual, LayerNorm). Every text is one segment (token type 0) at positions 0..L-1, and
padded keys are masked out of attention, so a row's real tokens do not depend on its
padding. Attention is vlpre's (`layers.Attention`, heads-major einsum on CPU).

Every weight carries logical axis names (vocab, embed, heads, kv = per-head dim, mlp,
norm), so a trainer shards it by its rules like any other tower. `params_from_state_dict`
maps the Hugging Face names; parameter paths:
  word_embed, position_embed, type_embed, ln_embed
  block_N/{attn/{query,key,value,out}, ln_attn, mlp_in, mlp_out, ln_mlp}

Shape letters: B batch, L tokens, D width, H heads, K per-head dim, F MLP width.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpre.nn import layers
from vlpre.nn import stack


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The shape of a BERT encoder (transformers' BertConfig fields, renamed)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_positions: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_hf(cls, hf_config: Any) -> "BertConfig":
    """Reads a transformers BertConfig; refuses variants this module does not compute."""
    activation = getattr(hf_config, "hidden_act", "gelu")
    if activation != "gelu":
      raise NotImplementedError(f"BERT hidden_act {activation!r} (only exact-erf 'gelu')")
    positions = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if positions != "absolute":
      raise NotImplementedError(f"BERT position_embedding_type {positions!r} (only 'absolute')")
    return cls(vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
               num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
               mlp_dim=hf_config.intermediate_size,
               max_positions=hf_config.max_position_embeddings,
               type_vocab_size=hf_config.type_vocab_size,
               layer_norm_eps=hf_config.layer_norm_eps)


def _layer_norm(config: BertConfig, dtype: Any, name: str) -> nn.LayerNorm:
  # BERT's epsilon (1e-12), and the two-pass variance PyTorch computes: the fast
  # E[x²] - E[x]² form costs parity at 1e-5 after a dozen LayerNorms.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False,
                      scale_init=layers.norm_init(),
                      bias_init=layers.norm_init(nn.initializers.zeros), name=name)


def _embed(rows: int, width: int, names: tuple[str | None, str], dtype: Any,
           name: str) -> nn.Embed:
  init = nn.with_logical_partitioning(nn.initializers.normal(0.02), names)
  return nn.Embed(rows, width, dtype=dtype, embedding_init=init, name=name)


def _dense(features: int, names: tuple[str, str], dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=layers.dense_init(names),
                  bias_init=layers.dense_init(names[1:], nn.initializers.zeros), name=name)


class BertBlock(nn.Module):
  """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
  config: BertConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, mask_BxL: jax.Array, layer_inputs=(None, 0.0)):
    """(x_BxLxD, None), as vlpre.nn.stack runs a block; `layer_inputs` is unused (no
    per-block inputs, no drop-path: a frozen encoder)."""
    del layer_inputs
    c = self.config
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))
    y_BxLxD = layers.Attention(c.num_heads, dtype=self.dtype, implementation=self.attention,
                               name="attn")(x_BxLxD, mask_BxL)
    x_BxLxD = _layer_norm(c, self.dtype, "ln_attn")(x_BxLxD + y_BxLxD)
    h_BxLxF = _dense(c.mlp_dim, ("embed", "mlp"), self.dtype, "mlp_in")(x_BxLxD)
    h_BxLxF = nn.with_logical_constraint(nn.gelu(h_BxLxF, approximate=False),
                                         ("batch", "length", "act_mlp"))
    y_BxLxD = _dense(c.hidden_size, ("mlp", "embed"), self.dtype, "mlp_out")(h_BxLxF)
    return _layer_norm(c, self.dtype, "ln_mlp")(x_BxLxD + y_BxLxD), None


class Bert(nn.Module):
  """`(input_ids_BxL, attention_mask_BxL) -> hidden_BxLxD`: the last layer's token states.

  Attributes:
    config: the architecture.
    dtype: computation dtype (parameters stay float32).
    attention: one of vlpre.nn.attention.IMPLEMENTATIONS.
  """
  config: BertConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, input_ids_BxL: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
    c = self.config
    seq_len = input_ids_BxL.shape[1]
    if seq_len > c.max_positions:
      raise ValueError(f"{seq_len} tokens exceed BERT's {c.max_positions} positions")
    positions_1xL = jnp.arange(seq_len)[None]
    x_BxLxD = (
        _embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), self.dtype,
               "word_embed")(input_ids_BxL)
        + _embed(c.max_positions, c.hidden_size, (None, "embed"), self.dtype,
                 "position_embed")(positions_1xL)
        + _embed(c.type_vocab_size, c.hidden_size, (None, "embed"), self.dtype,
                 "type_embed")(jnp.zeros_like(positions_1xL)))
    x_BxLxD = _layer_norm(c, self.dtype, "ln_embed")(x_BxLxD)
    # One parameter subtree per block (block_0, block_1, ...), as the checkpoints name them.
    x_BxLxD, _ = stack.stack(BertBlock, dict(config=c, dtype=self.dtype, attention=self.attention),
                             x_BxLxD, attention_mask_BxL, depth=c.num_layers, scan=False,
                             layer_name="block")
    return x_BxLxD


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: BertConfig) -> dict:
  """A Hugging Face BERT state dict -> `Bert`'s parameters (float32 numpy).

  Args:
    state_dict: PyTorch names and layout (`encoder.layer.3.attention.self.query.weight`,
      Linear weights [out, in]), with or without a task model's `bert.` prefix; old
      checkpoints' LayerNorm gamma/beta are accepted. A pooler, if present, is unused.
    config: the architecture.

  Raises:
    KeyError: a weight is missing.
  """
  state = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v
           for k, v in state_dict.items()}
  prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
  heads, head_dim = config.num_heads, config.hidden_size // config.num_heads

  def get(name: str) -> np.ndarray:
    if prefix + name not in state:
      raise KeyError(f"BERT checkpoint lacks {prefix + name!r}; it has e.g. {sorted(state)[:3]}")
    return np.asarray(state[prefix + name], np.float32)

  def norm(name):
    return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

  def linear(name):
    return {"kernel": get(f"{name}.weight").T, "bias": get(f"{name}.bias")}

  def to_heads(name):  # [H*K, D] -> kernel [D, H, K]
    return {"kernel": get(f"{name}.weight").T.reshape(-1, heads, head_dim),
            "bias": get(f"{name}.bias").reshape(heads, head_dim)}

  def from_heads(name):  # [D, H*K] -> kernel [H, K, D]
    return {"kernel": get(f"{name}.weight").T.reshape(heads, head_dim, -1),
            "bias": get(f"{name}.bias")}

  params = {
      "word_embed": {"embedding": get("embeddings.word_embeddings.weight")},
      "position_embed": {"embedding": get("embeddings.position_embeddings.weight")},
      "type_embed": {"embedding": get("embeddings.token_type_embeddings.weight")},
      "ln_embed": norm("embeddings.LayerNorm"),
  }
  for i in range(config.num_layers):
    layer = f"encoder.layer.{i}"
    params[f"block_{i}"] = {
        "attn": {**{n: to_heads(f"{layer}.attention.self.{n}") for n in ("query", "key", "value")},
                 "out": from_heads(f"{layer}.attention.output.dense")},
        "ln_attn": norm(f"{layer}.attention.output.LayerNorm"),
        "mlp_in": linear(f"{layer}.intermediate.dense"),
        "mlp_out": linear(f"{layer}.output.dense"),
        "ln_mlp": norm(f"{layer}.output.LayerNorm"),
    }
  return jax.tree.map(np.ascontiguousarray, params)


def load(hf_config: Any, state_dict: Mapping[str, np.ndarray] | None, *,
         dtype: Any = jnp.float32, attention: str = "auto") -> tuple[Bert, dict]:
  """The module for a transformers BertConfig and its weights, shapes checked (None: no
  weights; the parameters are then `jax.ShapeDtypeStruct`s, as `llm.abstract_weights`).

  Raises:
    NotImplementedError: a BERT variant this module does not compute.
    KeyError, ValueError: a missing weight or one whose shape disagrees with the config.
  """
  module = Bert(BertConfig.from_hf(hf_config), dtype=dtype, attention=attention)
  tokens_1x1 = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), tokens_1x1,
                                        tokens_1x1)["params"])
  if state_dict is None:
    return module, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
  params = params_from_state_dict(state_dict, module.config)
  if jax.tree.structure(params) != jax.tree.structure(shapes):
    raise ValueError("BERT weights do not fit the module's parameter tree")
  for (path, value), shape in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree.leaves(shapes)):
    if value.shape != shape.shape:
      raise ValueError(f"BERT weight {jax.tree_util.keystr(path)}: checkpoint shape "
                       f"{value.shape} != model shape {shape.shape}")
  return module, params
