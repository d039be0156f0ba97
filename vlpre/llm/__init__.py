"""vlpre's LLM layer: one decoder that encodes, generates and trains.

    llm = vlpre.llm.load("smollm2-135m")                    # weights, tokenizer, module
    llm = vlpre.llm.from_config(config.hive.llm, dtype=config.dtype)  # a config's LLM section
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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from vlpre.llm import checkpoints
from vlpre.llm.assets import MissingAssetError
from vlpre.llm.assets import PACKAGED_ASSETS
from vlpre.llm.assets import abstract_weights
from vlpre.llm.assets import read_source
from vlpre.llm.assets import weights_abstract
from vlpre.llm.model import Decoder
from vlpre.llm.config import DecoderConfig
from vlpre.llm.model import DecoderOutput
from vlpre.llm.model import ExtraKV
from vlpre.llm.config import SUPPORTED_MODEL_TYPES
from vlpre.llm.model import init_cache
from vlpre.llm.tokenizer import TextTokenizer

if TYPE_CHECKING:  # vlpre.data (grain) is the input side; the protocol is only a type here
  from vlpre.data.tokenizers import Tokenizer

__all__ = [
    "Decoder", "DecoderConfig", "DecoderOutput", "ExtraKV", "LLM", "MissingAssetError",
    "PACKAGED_ASSETS", "SECTION", "SUPPORTED_MODEL_TYPES", "TextTokenizer", "config_section",
    "abstract_weights", "decoder_options", "from_config", "init_cache", "load", "weights_abstract",
]


@dataclasses.dataclass
class LLM:
  """A pretrained decoder ready to run, train or generate.

  Attributes:
    name: what `load` was given.
    module: the `Decoder` (its attributes say scan/groups/remat/dtype).
    params: float32 numpy parameter tree, laid out for `module` (stacked if scanned).
    tokenizer: the model's tokenizer (vlpre.data.tokenizers.Tokenizer; a TextTokenizer
      for a loaded checkpoint, CLIP's BPE for LCL's from-scratch decoder).
    config: the DecoderConfig.
    hf_config: the transformers config it was read from (token ids, model type).
  """
  name: str
  module: Decoder
  params: Any
  tokenizer: Tokenizer
  config: DecoderConfig
  hf_config: Any

  def init_cache(self, batch: int, slots: int, dtype=jnp.float32) -> dict:
    return init_cache(self.config, batch, slots, scan=self.module.scan,
                      groups=self.module.layer_groups, dtype=dtype)

  def stop_ids(self) -> set[int]:
    """Token ids that end a generation (EOS and the chat end-of-turn where present)."""
    ids = {self.tokenizer.eos_id, getattr(self.hf_config, "eos_token_id", None),
           self.tokenizer.token_to_id("<|endoftext|>"),
           self.tokenizer.token_to_id("<|im_end|>")}
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


def load(name: str, *, dtype: Any = jnp.float32, scan: bool = True,
         layer_groups: tuple[int, ...] = (), remat: str = "none", causal: bool = True,
         num_layers: int | None = None, final_norm: bool = True, lm_head: bool = True,
         tokens: bool = True, template: str = "{text}", max_len: int = 77,
         append_eos: bool = True, revision: str | None = None,
         allow_download: bool = False) -> LLM:
  """Loads a pretrained Llama/Mistral/Qwen2/Qwen3 decoder.

  Args:
    name: "smollm2-135m", a local .gguf file or HF folder, or a hub id.
    dtype, scan, layer_groups, remat, causal, final_norm: `Decoder` attributes.
    num_layers: keep only the first N layers (an intermediate-layer text embedding, or a
      few LLM blocks as a vision backbone); the rest are never read.
    lm_head: load the LM head (the embedding matrix when tied).
    tokens: load the token embedding (False: an embeddings-only user, e.g. bridge).
    template, max_len, append_eos: the tokenizer's settings (`read_source`).
    revision, allow_download: fetch a hub id, at that commit (`vlpre.llm.assets.resolve`).

  Cached per process on its arguments (they must be hashable: tuples, dtypes): the
  encoder, the generator and a method's model built from one checkpoint share one
  parameter tree instead of re-stacking it. Treat the returned arrays as read-only.
  Inside `abstract_weights()` the parameters are `jax.ShapeDtypeStruct`s (float32) and
  no weight is read: the folder needs only its config and tokenizer.
  """
  return _load(name, dtype=dtype, scan=scan, layer_groups=layer_groups, remat=remat,
               causal=causal, num_layers=num_layers, final_norm=final_norm, lm_head=lm_head,
               tokens=tokens, template=template, max_len=max_len, append_eos=append_eos,
               revision=revision, allow_download=allow_download, abstract=weights_abstract())


@functools.lru_cache(maxsize=4)
def _load(name: str, *, dtype, scan, layer_groups, remat, causal, num_layers, final_norm,
          lm_head, tokens, template, max_len, append_eos, revision, allow_download,
          abstract: bool) -> LLM:
  start = time.perf_counter()
  source = read_source(name, template=template, max_len=max_len, append_eos=append_eos,
                       revision=revision, allow_download=allow_download)
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
  if abstract:
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
  else:
    params = checkpoints.state_dict_to_params(source.state_dict, shapes)
  logging.info("loaded LLM %s (%s, %d of %d layers%s) in %.1fs", name, hf_config.model_type,
               config.num_layers, hf_config.num_hidden_layers,
               ", abstract weights" if abstract else "", time.perf_counter() - start)
  return LLM(name=name, module=module, params=params, tokenizer=source.tokenizer, config=config,
             hf_config=hf_config)


# The one shape of a config section naming a pretrained LLM (`c.hive.llm`, `c.lcl.llm`,
# `c.bridge.llm`, `c.describe.llm`, `c.llm`; configs/*.py build it with `config_section`).
# What a method decides itself (its tokenizer's row length, whether it needs the token
# table or the LM head) is not here: the method passes it to `from_config`.
SECTION = dict(
    name="",               # "smollm2-135m", a local .gguf file or HF folder, a hub id; "": none
    revision="",           # a hub id's commit hash (40 hex digits): required to download
    allow_download=False,  # fetch a hub id from the Hugging Face hub (assets.resolve)
    dtype="",              # computation dtype, e.g. "bfloat16"; "": the run's config.dtype
    scan=True,             # scan the layers over stacked parameters (False: a subtree each)
    layer_groups=(),       # scanned groups, e.g. (10, 20): their own subtrees for freezing
    remat="none",          # vlpre.nn.stack.REMAT_POLICIES (training memory vs recompute)
    num_layers=0,          # keep the first N layers (0: all)
    causal=True,           # False: bidirectional attention (bridge training)
)


def config_section(name: str = "", **fields) -> dict:
  """A config section of SECTION's shape: `name` and the fields that differ from SECTION.

  Every field is present, so each can be overridden from the command line
  (`--config.hive.llm.num_layers=2`).
  """
  unknown = sorted(set(fields) - set(SECTION))
  if unknown:
    raise ValueError(f"unknown LLM section fields {unknown}; known: {sorted(SECTION)}")
  return {**SECTION, **fields, "name": name}


def _section_fields(section: Mapping[str, Any] | Any) -> dict[str, Any]:
  """The section's fields (a ConfigDict or a dict), with SECTION's values for those left out."""
  fields = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  unknown = sorted(set(fields) - set(SECTION))
  if unknown:
    raise ValueError(f"unknown LLM section fields {unknown}; known: {sorted(SECTION)}")
  return {**SECTION, **fields}


def decoder_options(section: Mapping[str, Any] | Any, *, dtype: Any = "float32") -> dict[str, Any]:
  """`Decoder` keyword arguments a section sets (dtype, causal, scan, layer_groups, remat);
  `dtype` is the run's, used where the section's is ""."""
  fields = _section_fields(section)
  return dict(dtype=jnp.dtype(fields["dtype"] or dtype), causal=bool(fields["causal"]),
              scan=bool(fields["scan"]), layer_groups=tuple(int(g) for g in fields["layer_groups"]),
              remat=str(fields["remat"]))


def from_config(section: Mapping[str, Any] | Any, *, dtype: Any = "float32",
                **method_args) -> LLM:
  """Loads the pretrained LLM a config section names (SECTION's shape).

  Args:
    section: the section, e.g. `config.hive.llm`; fields left out take SECTION's values.
    dtype: the run's computation dtype (`config.dtype`), used where the section's is "".
    **method_args: what the method decides, not the user: `load`'s tokens, lm_head,
      final_norm, template, max_len, append_eos.
  """
  fields = _section_fields(section)
  if not fields["name"]:
    raise ValueError("the LLM section names no model (name is empty)")
  clash = sorted(set(method_args) & set(SECTION))
  if clash:
    raise ValueError(f"{clash} are the config section's fields, not the method's")
  return load(str(fields["name"]), **decoder_options(fields, dtype=dtype),
              num_layers=int(fields["num_layers"]) or None, revision=fields["revision"] or None,
              allow_download=bool(fields["allow_download"]), **method_args)
