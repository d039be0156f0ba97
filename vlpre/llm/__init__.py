"""vlpre's LLM layer: one decoder that encodes, generates and trains.

    llm = vlpre.llm.load("smollm2-135m")                    # weights, tokenizer, module
    ids_BxL, mask_BxL = llm.tokenizer.encode_batch(captions, 32)
    out = llm.module.apply({"params": llm.params}, ids_BxL, mask_BxL, return_logits=True)
    texts = vlpre.llm.generate.generate(llm, prompts, max_new_tokens=20)

Everything a method needs from a decoder goes through `Decoder` (vlpre/llm/model.py):
input embeddings, segment ids, positions, causal or bidirectional attention, per-layer
extra keys/values, the LM head, the KV cache. Losses live in `vlpre.losses`
("lm": next-token cross-entropy); frozen pooled embedders in `vlpre.text_encoders`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp

from vlpre.llm import checkpoints
from vlpre.llm.assets import MissingAssetError
from vlpre.llm.assets import PACKAGED_ASSETS
from vlpre.llm.assets import read_source
from vlpre.llm.model import Decoder
from vlpre.llm.config import DecoderConfig
from vlpre.llm.model import DecoderOutput
from vlpre.llm.model import ExtraKV
from vlpre.llm.config import SUPPORTED_MODEL_TYPES
from vlpre.llm.model import init_cache
from vlpre.llm.tokenizer import TextTokenizer

__all__ = [
    "Decoder", "DecoderConfig", "DecoderOutput", "ExtraKV", "LLM", "MissingAssetError",
    "PACKAGED_ASSETS", "SUPPORTED_MODEL_TYPES", "TextTokenizer", "init_cache", "load",
]


@dataclasses.dataclass
class LLM:
  """A pretrained decoder ready to run, train or generate.

  Attributes:
    name: what `load` was given.
    module: the `Decoder` (its attributes say scan/groups/remat/dtype).
    params: float32 numpy parameter tree, laid out for `module` (stacked if scanned).
    tokenizer: the model's TextTokenizer.
    config: the DecoderConfig.
    hf_config: the transformers config it was read from (token ids, model type).
  """
  name: str
  module: Decoder
  params: Any
  tokenizer: TextTokenizer
  config: DecoderConfig
  hf_config: Any

  def init_cache(self, batch: int, slots: int, dtype=jnp.float32) -> dict:
    return init_cache(self.config, batch, slots, scan=self.module.scan,
                      groups=self.module.layer_groups, dtype=dtype)

  def stop_ids(self) -> set[int]:
    """Token ids that end a generation (EOS and the chat end-of-turn where present)."""
    ids = {self.tokenizer.eos_id, getattr(self.hf_config, "eos_token_id", None),
           self.tokenizer.backend.token_to_id("<|endoftext|>"),
           self.tokenizer.backend.token_to_id("<|im_end|>")}
    return {int(i) for i in ids if i is not None}


def param_shapes(module: Decoder, *, tokens: bool = True, logits: bool = False) -> Any:
  """The module's parameter tree as ShapeDtypeStructs (nothing is initialised)."""
  ids_1x1 = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  if tokens:
    fn = functools.partial(module.init, return_logits=logits)
    return jax.eval_shape(fn, jax.random.key(0), ids_1x1)["params"]
  embeds = jax.ShapeDtypeStruct((1, 1, module.config.hidden_size), jnp.float32)
  return jax.eval_shape(lambda rng, e: module.init(rng, embeddings_BxLxD=e),
                        jax.random.key(0), embeds)["params"]


@functools.lru_cache(maxsize=4)
def load(name: str, *, dtype: Any = jnp.float32, scan: bool = True,
         layer_groups: tuple[int, ...] = (), remat: str = "none", causal: bool = True,
         num_layers: int | None = None, final_norm: bool = True, lm_head: bool = True,
         tokens: bool = True, template: str = "{text}", max_len: int = 77,
         append_eos: bool = True) -> LLM:
  """Loads a pretrained Llama/Mistral/Qwen2/Qwen3 decoder.

  Args:
    name: "smollm2-135m", a local .gguf file or HF folder, or a hub id.
    dtype, scan, layer_groups, remat, causal, final_norm: `Decoder` attributes.
    num_layers: keep only the first N layers (an intermediate-layer text embedding, or a
      few LLM blocks as a vision backbone); the rest are never read.
    lm_head: load the LM head (the embedding matrix when tied).
    tokens: load the token embedding (False: an embeddings-only user, e.g. bridge).
    template, max_len, append_eos: the tokenizer's settings (`read_source`).

  Cached per process on its arguments (they must be hashable: tuples, dtypes): the
  encoder, the generator and a method's model built from one checkpoint share one
  parameter tree instead of re-stacking it. Treat the returned arrays as read-only.
  """
  start = time.perf_counter()
  source = read_source(name, template=template, max_len=max_len, append_eos=append_eos)
  hf_config = source.hf_config
  if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{name!r} is a {hf_config.model_type} model, not a decoder LLM "
                     f"({SUPPORTED_MODEL_TYPES})")
  config = DecoderConfig.from_hf(hf_config)
  if num_layers is not None:
    if not 0 < num_layers <= config.num_layers:
      raise ValueError(f"num_layers={num_layers}: {name!r} has {config.num_layers} layers")
    config = dataclasses.replace(config, num_layers=num_layers)
  module = Decoder(config, dtype=dtype, causal=causal, scan=scan, layer_groups=layer_groups,
                   remat=remat, final_norm=final_norm)
  shapes = param_shapes(module, tokens=tokens, logits=lm_head)
  params = checkpoints.state_dict_to_params(source.state_dict, shapes)
  logging.info("loaded LLM %s (%s, %d of %d layers) in %.1fs", name, hf_config.model_type,
               config.num_layers, hf_config.num_hidden_layers, time.perf_counter() - start)
  return LLM(name=name, module=module, params=params, tokenizer=source.tokenizer, config=config,
             hf_config=hf_config)
