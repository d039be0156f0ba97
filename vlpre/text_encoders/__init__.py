"""Frozen pretrained text encoders (decoder LLMs and BERT embedders) for vlpre.

    encoder = load_text_encoder("smollm2-135m", max_len=77)
    ids_BxL, mask_BxL = encoder.tokenizer.encode_batch(captions, encoder.max_len)
    emb_BxD = encoder.module.apply({"params": encoder.params}, ids_BxL, mask_BxL)

`encoder.module` is a Linen module, so a larger model can hold it as a submodule and
receive `encoder.params` as a separate, frozen argument; `logical_axes()` names each
weight's dimensions for sharding those weights.

Decoders run on vlpre's one decoder (`vlpre.llm`); this package adds only what turns a
model into a fixed embedder: a prompt template around the text (PromptEOL / FLAME style),
the layer read out (an intermediate layer runs a truncated decoder: the later layers are
never computed), pooling and L2 normalisation. BERT checkpoints run on vlpre's own
BERT encoder (`vlpre.text_encoders.bert`), loaded from the checkpoint's PyTorch-named weights.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import logging
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpre import llm as llm_lib
from vlpre.data import text_batching
from vlpre.llm.assets import MissingAssetError
from vlpre.llm.assets import PACKAGED_ASSETS
from vlpre.llm.tokenizer import TextTokenizer
from vlpre.text_encoders import bert
from vlpre.text_encoders import recipes
from vlpre.text_encoders.pooling import POOLING_KINDS
from vlpre.text_encoders.pooling import PooledTextEncoder
from vlpre.text_encoders.pooling import pool_hidden_states

__all__ = [
    "FrozenTextEncoder", "MissingAssetError", "PACKAGED_ASSETS", "POOLING_KINDS",
    "PooledTextEncoder", "TextTokenizer", "load_text_encoder", "pool_hidden_states",
]

_DECODER_POOLING = "last"
_BERT_POOLING = "mean"


@dataclasses.dataclass
class FrozenTextEncoder:
  """A pretrained text encoder ready to be used frozen.

  Attributes:
    name: what `load_text_encoder` was given.
    module: Linen module, `(input_ids_BxL, attention_mask_BxL) -> embedding_BxD` (float32).
    params: its parameters, `{"backbone": ...}`, float32 numpy arrays.
    tokenizer: `encode_batch(texts, max_len) -> (ids, mask)`, plus `vocab_size`, `pad_id`.
    dim: embedding width D.
    pooling: one of POOLING_KINDS.
    normalize: whether embeddings are L2-normalised.
    max_len: the sequence length the encoder was set up for.
    hf_config: the transformers config of the underlying model.
  """
  name: str
  module: nn.Module
  params: Any
  tokenizer: TextTokenizer
  dim: int
  pooling: str
  normalize: bool
  max_len: int
  hf_config: Any = None

  @functools.cached_property
  def _jitted_apply(self):
    return jax.jit(self.module.apply)

  def logical_axes(self) -> Any:
    """Logical axis names of every weight (a tree of tuples like `params`): both backbones,
    vlpre's decoder and its BERT, name them inside the module.
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(self.module.init, jax.random.key(0), tokens, tokens)["params"]
    specs = nn.get_partition_spec(abstract)
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

  def embed(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Embeds texts in length-bucketed batches (vlpre.data.text_batching: same results
    as padding every text to max_len, a fraction of the compute).

    Returns:
      float32 [len(texts), dim].
    """
    if not len(texts):
      return np.zeros((0, self.dim), np.float32)
    apply = self._jitted_apply
    variables = jax.device_put({"params": self.params})  # once, not per batch.
    ids_NxL, mask_NxL = self.tokenizer.encode_batch(list(texts), self.max_len)
    out_NxD = np.zeros((len(texts), self.dim), np.float32)
    for rows, ids_BxL, mask_BxL in text_batching.bucketed_batches(ids_NxL, mask_NxL, batch_size):
      out_NxD[rows] = np.asarray(apply(variables, ids_BxL, mask_BxL))[:len(rows)]
    return out_NxD


def _apply_recipe(name: str, template: str | None, pooling: str | None,
                  append_eos: bool | None, causal: bool | None):
  """(source name, template, pooling, append_eos, causal) after a saved recipe's settings
  (vlpre.text_encoders.recipes); an argument that contradicts the recipe is an error."""
  recipe = recipes.find(name)
  if recipe is None:
    return name, template or "{text}", pooling, append_eos, True if causal is None else causal
  given = dict(template=template, pooling=pooling, append_eos=append_eos, causal=causal)
  tuned = dict(template=recipe.template, pooling=recipe.pooling, append_eos=recipe.append_eos,
               causal=recipe.causal)
  clash = [f"{k}={given[k]!r} (tuned with {tuned[k]!r})" for k in given
           if given[k] is not None and given[k] != tuned[k]]
  if clash:
    raise ValueError(f"text encoder {name!r} is a tuned recipe: {', '.join(clash)}; leave "
                     "these settings empty to use the recipe's")
  return (recipe.directory, recipe.template, recipe.pooling, recipe.append_eos, recipe.causal)


def load_text_encoder(name: str, *, max_len: int = 77, dtype: Any = jnp.float32,
                      pooling: str | None = None, normalize: bool = True,
                      template: str | None = None, layer: int = -1,
                      append_eos: bool | None = None, scan: bool = True,
                      causal: bool | None = None) -> FrozenTextEncoder:
  """Loads a pretrained text encoder with its weights and tokenizer.

  Args:
    name: "smollm2-135m", "minilm-l6", a local HF folder (safetensors or Flax weights), a
      local .gguf file, a Hugging Face hub id, or a saved recipe (a tuned decoder:
      vlpre.text_encoders.recipes, by folder or name), whose template, pooling,
      append_eos and causal apply. Llama/Mistral/Qwen2/Qwen3 checkpoints run on vlpre's
      decoder, BERT ones on vlpre's BERT encoder.
    max_len: token length L of every encoded text (special tokens included).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
    pooling: one of POOLING_KINDS; default "last" for decoders, "mean" for BERT.
    normalize: L2-normalise the pooled embedding.
    template: where the text goes, e.g. `This sentence : "{text}" means in one word:"`
      (PromptEOL) or an instruction prefix `Query: {text}`; None: a recipe's, else "{text}".
    layer: decoders only: -1 reads the final (normed) hidden states; 1..num_layers-1 the
      residual stream after that many blocks (transformers' `hidden_states[layer]`).
    append_eos: end decoder rows with EOS (default: only without a template, so a
      template's own last token is what "last" pooling reads, as PromptEOL does).
    scan: scan the decoder's layers (stacked parameters, flat compile time).
    causal: decoders: causal attention as pretrained; False bidirectional (LLM2Vec);
      None: a recipe's, else causal.

  Returns:
    A FrozenTextEncoder.

  Raises:
    MissingAssetError: a packaged asset's pip package is not installed.
    FileNotFoundError: the name resolves to nothing.
    ValueError: an unknown pooling kind, a bad layer, or max_len beyond the model's positions.
    NotImplementedError: an architecture or file variant vlpre does not implement.
  """
  if pooling is not None and pooling not in POOLING_KINDS:
    raise ValueError(f"pooling {pooling!r} not in {POOLING_KINDS}")
  shown = name
  name, template, pooling, append_eos, causal = _apply_recipe(name, template, pooling,
                                                              append_eos, causal)
  if append_eos is None:
    append_eos = template == "{text}"
  start = time.perf_counter()
  source = llm_lib.read_source(name, template=template, max_len=max_len, append_eos=append_eos)
  hf_config = source.hf_config
  model_type = hf_config.model_type
  if model_type in llm_lib.SUPPORTED_MODEL_TYPES:
    num_layers = hf_config.num_hidden_layers
    if layer != -1 and not 0 < layer < num_layers:
      raise ValueError(f"layer={layer}: {name!r} has {num_layers} layers (use -1 for the last, "
                       f"or 1..{num_layers - 1})")
    llm = llm_lib.load(name, dtype=dtype, scan=scan, lm_head=False, causal=causal,
                       num_layers=None if layer == -1 else layer, final_norm=layer == -1,
                       template=template, max_len=max_len, append_eos=append_eos)
    backbone, backbone_params = llm.module, llm.params
    pooling = pooling or _DECODER_POOLING
  elif model_type == "bert":
    if layer != -1 or not causal:
      raise NotImplementedError("layer= and causal= are decoder settings; BERT encoders use "
                                "their last layer, bidirectional")
    backbone, backbone_params = bert.load(
        hf_config, None if llm_lib.weights_abstract() else source.state_dict, dtype=dtype)
    pooling = pooling or _BERT_POOLING
  else:
    raise NotImplementedError(
        f"text encoder {name!r}: model_type {model_type!r} (supported: "
        f"{llm_lib.SUPPORTED_MODEL_TYPES + ('bert',)})")
  max_positions = getattr(hf_config, "max_position_embeddings", None)
  if max_positions is not None and max_len > max_positions:
    raise ValueError(f"max_len={max_len} exceeds the model's {max_positions} positions")
  if pooling == "eos" and source.tokenizer.eos_id is None:
    raise ValueError(f"{name!r}: eos pooling needs a tokenizer with an EOS token")

  module = PooledTextEncoder(backbone=backbone, pooling=pooling, normalize=normalize,
                             eos_id=source.tokenizer.eos_id)
  logging.info("loaded text encoder %s (%s) in %.1fs", name, model_type,
               time.perf_counter() - start)
  return FrozenTextEncoder(
      name=shown, module=module, params={"backbone": backbone_params},
      tokenizer=source.tokenizer, dim=hf_config.hidden_size, pooling=pooling,
      normalize=normalize, max_len=max_len, hf_config=hf_config)
