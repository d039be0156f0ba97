"""Reading pretrained checkpoints (LLMs and BERT embedders) into numpy, without torch.

Every source is first turned into a *Hugging Face state dict*: PyTorch names and layouts
(`model.layers.0.self_attn.q_proj.weight`, Linear weights [out, in]) with float32 numpy
values. `state_dict_to_params` then maps that onto the decoder's parameter tree (BERT's
own mapping is `vlpre.text_encoders.bert.params_from_state_dict`). Sources:
- GGUF files (llama.cpp): dequantized with the `gguf` package, q/k permutation undone;
- safetensors files (single or sharded), including bfloat16 ones;
- transformers Flax checkpoints (`flax_model.msgpack`).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from flax import core as flax_core
from flax import serialization
from flax import traverse_util
import flax.linen as nn
import ml_dtypes
import numpy as np
from tokenizers import AddedToken
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import Tokenizer

from vlpre import sharding
from vlpre import storage

StateDict = dict[str, np.ndarray]

# --------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------

# llama.cpp tensor names -> transformers names, for the Llama-family architectures
# (gguf-py's `TENSOR_MAPPINGS`, inverted for the tensors these models have).
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF architectures whose metadata keys transformers' GGUF_CONFIG_MAPPING knows and whose
# tensors the table above covers.
_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp's pre-tokenizer names for byte-level BPE vocabularies whose regexes are
# GPT-2's, optionally preceded by splitting every digit on its own (llama-vocab.cpp).
_GGUF_GPT2_PRE = ("default", "gpt2", "mpt", "olmo")
_GGUF_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone",
                         "minerva")


def _gguf_hf_name(gguf_name: str) -> str | None:
  """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None: unknown)."""
  module, _, suffix = gguf_name.rpartition(".")
  if module in _GGUF_GLOBAL_NAMES:
    return f"{_GGUF_GLOBAL_NAMES[module]}.{suffix}"
  match = re.fullmatch(r"blk\.(\d+)\.(\w+)", module)
  if match and match.group(2) in _GGUF_BLOCK_NAMES:
    return f"model.layers.{match.group(1)}.{_GGUF_BLOCK_NAMES[match.group(2)]}.{suffix}"
  return None


def unpermute_gguf_qk(weight_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (transformers' `_reverse_permute_weights`).

  llama.cpp's converter reorders each head's rows from the half-split RoPE layout of HF
  checkpoints ([x_0..x_{K/2-1}, x_{K/2}..]) to interleaved pairs ([x_0, x_{K/2}, x_1, ..]);
  this puts them back so the `rotate_half` RoPE applies.
  """
  head_dim = weight_OxI.shape[0] // num_heads
  w = weight_OxI.reshape(num_heads, head_dim // 2, 2, *weight_OxI.shape[1:])
  return w.swapaxes(1, 2).reshape(weight_OxI.shape)


class GGUFCheckpoint:
  """A GGUF file's metadata, transformers config and dequantized weights."""

  def __init__(self, path: str | os.PathLike[str]):
    import gguf  # pylint: disable=g-import-not-at-top  (heavy; only GGUF loading needs it)
    self.path = os.fspath(path)
    self._reader = gguf.GGUFReader(self.path)
    self.metadata: dict[str, Any] = {
        key: field.contents() for key, field in self._reader.fields.items()
        if not key.startswith("tokenizer.ggml.")  # big token lists: read on demand below.
    }
    self.architecture: str = self.metadata["general.architecture"]
    if self.architecture not in _GGUF_ARCHITECTURES:
      raise NotImplementedError(
          f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
          f"(supported: {_GGUF_ARCHITECTURES})")

  def field(self, key: str, default: Any = None) -> Any:
    field = self._reader.fields.get(key)
    return default if field is None else field.contents()

  def hf_config(self, **overrides: Any):
    """A transformers config (LlamaConfig, ...) from the GGUF metadata.

    Uses transformers' own GGUF metadata -> config key table so both readers agree.
    """
    # Imported here: transformers takes seconds to import and only loading needs it.
    import transformers  # pylint: disable=g-import-not-at-top  (heavy: GGUF tokenizers only)
    from transformers.integrations import ggml  # pylint: disable=g-import-not-at-top  (heavy: GGUF tokenizers only)
    arch = self.architecture
    kwargs: dict[str, Any] = {}
    for gguf_key, hf_key in ggml.GGUF_CONFIG_MAPPING[arch].items():
      value = self.metadata.get(f"{arch}.{gguf_key}")
      if hf_key is not None and value is not None:
        kwargs[hf_key] = value
    if "vocab_size" not in kwargs:
      kwargs["vocab_size"] = len(self._reader.fields["tokenizer.ggml.tokens"].data)
    tensor_names = {t.name for t in self._reader.tensors}
    kwargs["tie_word_embeddings"] = "output.weight" not in tensor_names
    if "rope_freqs.weight" in tensor_names:
      # llama.cpp stores Llama-3.1 RoPE scaling as a tensor; its config keys are not mapped.
      raise NotImplementedError(f"{self.path}: GGUF with rope_freqs (Llama-3.1 RoPE scaling)")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
      value = self.field(f"tokenizer.ggml.{key}")
      if value is not None:
        kwargs[key.replace("padding", "pad")] = int(value)
    model_type = arch
    # As in transformers: llama.cpp files Mistral models under the llama architecture.
    if arch == "llama" and "mistral" in str(self.metadata.get("general.name", "")).lower():
      model_type = "mistral"
    kwargs.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kwargs)

  def state_dict(self, skip: tuple[str, ...] = ()) -> StateDict:
    """Dequantized float32 weights under transformers names.

    Args:
      skip: HF names not to dequantize.
    """
    from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top  (only GGUF loading needs it)
    num_heads = self.metadata[f"{self.architecture}.attention.head_count"]
    num_kv_heads = self.metadata.get(f"{self.architecture}.attention.head_count_kv", num_heads)
    state: StateDict = {}
    for tensor in self._reader.tensors:
      name = _gguf_hf_name(tensor.name)
      if name is None:
        raise NotImplementedError(f"{self.path}: unknown GGUF tensor {tensor.name!r}")
      if name in skip:
        continue
      weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
      # Only llama.cpp's *llama* converter permutes q/k (Qwen files keep the HF layout).
      if self.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        weight = unpermute_gguf_qk(weight, num_heads if "q_proj" in name else num_kv_heads)
      state[name] = weight
    return state

  def tokenizer(self) -> Tokenizer:
    """A `tokenizers.Tokenizer` for the GGUF's byte-level BPE vocabulary.

    Built here rather than with transformers' `convert_gguf_tokenizer`, which for this
    vocabulary type reports the BOS token as EOS and adds a BOS post-processor.
    """
    kind = self.field("tokenizer.ggml.model")
    if kind != "gpt2":
      raise NotImplementedError(
          f"{self.path}: GGUF tokenizer type {kind!r}; only byte-level BPE ('gpt2') is built "
          "here. Load the model from its Hugging Face folder instead.")
    tokens: list[str] = self.field("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ")) for merge in self.field("tokenizer.ggml.merges")]
    token_types = self.field("tokenizer.ggml.token_type", [1] * len(tokens))
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    pre = self.field("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=True)
    if pre in _GGUF_DIGIT_SPLIT_PRE:
      tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
          [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GGUF_GPT2_PRE:
      tokenizer.pre_tokenizer = byte_level
    else:
      raise NotImplementedError(f"{self.path}: GGUF pre-tokenizer {pre!r}")
    tokenizer.decoder = decoders.ByteLevel()
    # gguf TokenType: 3 = CONTROL (special tokens), 4 = USER_DEFINED (added tokens).
    tokenizer.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types) if kind == 3])
    tokenizer.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types) if kind == 4])
    return tokenizer


# --------------------------------------------------------------------------------------
# safetensors / Flax msgpack
# --------------------------------------------------------------------------------------

# Read by hand because `safetensors.numpy` has no bfloat16 (most LLM checkpoints are bf16)
# and its torch/flax frameworks would need torch or a device round trip.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike[str]) -> StateDict:
  """Floating-point tensors of one .safetensors file as float32 numpy (others skipped)."""
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  state: StateDict = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    if not np.issubdtype(dtype, np.floating) and dtype is not ml_dtypes.bfloat16:
      continue  # buffers such as BERT's position_ids.
    start, end = info["data_offsets"]
    raw = data[start:end].view(dtype).reshape(info["shape"])
    state[name] = np.asarray(raw, dtype=np.float32)
  return state


def read_flax_msgpack(path: str | os.PathLike[str]) -> StateDict:
  """A transformers Flax checkpoint, renamed and transposed back to PyTorch conventions."""
  with open(path, "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  state: StateDict = {}
  for path_tuple, value in traverse_util.flatten_dict(tree).items():
    *modules, leaf = (str(p) for p in path_tuple)
    value = np.asarray(value, dtype=np.float32)
    if leaf == "kernel" and value.ndim == 2:
      leaf, value = "weight", value.T
    elif leaf in ("embedding", "scale"):
      leaf = "weight"
    state[".".join([*modules, leaf])] = value
  return state


def read_hf_weights(folder: str | os.PathLike[str]) -> StateDict:
  """All weights of a Hugging Face model folder (safetensors preferred, else Flax)."""
  folder = os.fspath(folder)
  for filename, reader in (("model.safetensors", read_safetensors),
                           ("flax_model.msgpack", read_flax_msgpack)):
    single = os.path.join(folder, filename)
    index = single + ".index.json"
    if os.path.exists(single):
      return reader(single)
    if os.path.exists(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      state: StateDict = {}
      for shard in shards:
        state.update(reader(storage.join_inside(folder, shard, what=f"{index}: weight_map file")))
      return state
  raise FileNotFoundError(
      f"{folder} has no model.safetensors or flax_model.msgpack (single or sharded). "
      "PyTorch .bin checkpoints would need torch: convert them to safetensors first.")


# --------------------------------------------------------------------------------------
# HF state dict -> Flax parameters
# --------------------------------------------------------------------------------------

# Prefixes task heads put before the backbone's names (LlamaForCausalLM: `model.`); the
# first one under which every needed name exists is used.
# A causal LM's head sits outside that prefix (`lm_head.weight`).
_PREFIXES = ("", "model.", "transformer.")
_UNPREFIXED = ("lm_head.",)


def _hf_name(flax_path: tuple[str, ...], layer: int | None = None) -> tuple[str, bool]:
  """Flax parameter path -> (HF name, whether the array is transposed).

  `('layers_3', 'mlp', 'up_proj', 'kernel')` -> (`layers.3.mlp.up_proj.weight`, True); a
  stacked group (`('layers', ...)`, `('layers_0to9', ...)`) names layer `layer` of it.
  """
  *modules, leaf = flax_path
  if layer is not None:
    modules = [f"layers.{layer}", *modules[1:]]
  modules = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules]
  base = ".".join(modules)
  if leaf == "kernel":
    return f"{base}.weight", True
  if leaf in ("embedding", "scale"):
    return f"{base}.weight", False
  return f"{base}.{leaf}", False


def _layers_of(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> list[int] | None:
  """The checkpoint layers a stacked parameter group holds (None: one layer, a rename)."""
  layers = sharding.block_indices(flax_path[:1], shape)
  return layers if isinstance(layers, list) else None


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], param_shapes: Any) -> Any:
  """Fills a Flax parameter tree (shapes from `jax.eval_shape(module.init, ...)`).

  Scanned decoder groups are stacked here: `layers.N.*` of the checkpoint become the
  leading axis of the group's arrays, so loading costs no extra step at run time.

  Args:
    state_dict: HF names -> numpy arrays in PyTorch layout.
    param_shapes: the target tree; leaves need only `.shape` (boxed leaves are unboxed).

  Returns:
    The same tree with float32 numpy arrays.

  Raises:
    KeyError: a parameter the module needs is missing from the checkpoint.
    ValueError: a shape disagrees.
  """
  flat_shapes = traverse_util.flatten_dict(flax_core.unfreeze(nn.meta.unbox(param_shapes)))
  names = {}
  for path, shape_struct in flat_shapes.items():
    layers = _layers_of(path, tuple(shape_struct.shape))
    names[path] = ([_hf_name(path)] if layers is None else
                   [_hf_name(path, layer) for layer in layers], layers is not None)
  needed = [n for entries, _ in names.values() for n, _ in entries
            if not n.startswith(_UNPREFIXED)]
  prefix = next((p for p in _PREFIXES if all(p + n in state_dict for n in needed)), None)
  if prefix is None:
    missing = sorted(n for n in needed if n not in state_dict)
    raise KeyError(f"checkpoint lacks {len(missing)} parameters the model needs, e.g. "
                   f"{missing[:5]}; it has e.g. {sorted(state_dict)[:5]}")
  params = {}
  for path, shape_struct in flat_shapes.items():
    entries, stacked = names[path]
    values = []
    for name, transposed in entries:
      full = name if name.startswith(_UNPREFIXED) else prefix + name
      if full not in state_dict:
        raise KeyError(f"checkpoint lacks {full!r} (an untied LM head?)")
      values.append(state_dict[full].T if transposed else state_dict[full])
    value = np.stack(values) if stacked else values[0]
    if tuple(value.shape) != tuple(shape_struct.shape):
      raise ValueError(f"{prefix + entries[0][0]}: checkpoint shape {value.shape} (transposed: "
                       f"{entries[0][1]}, stacked: {stacked}) != model shape {shape_struct.shape}")
    params[path] = np.ascontiguousarray(value, dtype=np.float32)
  return traverse_util.unflatten_dict(params)


def params_to_state_dict(params: Any, prefix: str = "model.") -> StateDict:
  """The inverse of `state_dict_to_params`: a decoder's parameter tree as HF names and
  PyTorch layouts (float32 numpy), stacked groups split into their layers. An LM head
  keeps its unprefixed name; the token table and every block take `prefix`.
  """
  state: StateDict = {}
  for path, value in traverse_util.flatten_dict(flax_core.unfreeze(params)).items():
    value = np.asarray(value, np.float32)
    layers = _layers_of(path, value.shape)
    for i, layer in enumerate(layers or [None]):
      name, transposed = _hf_name(path, layer)
      array = value if layer is None else value[i]
      full = name if name.startswith(_UNPREFIXED) else prefix + name
      state[full] = np.ascontiguousarray(array.T if transposed else array)
  return state
