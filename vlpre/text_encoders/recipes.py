"""Saved text-encoder recipes: a tuned decoder and how it embeds, loadable by name.

A recipe is a folder, written by `save` (vlpre.methods.text_embedder tunes a decoder
into an embedder and saves one):

  config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
  model.safetensors   a Hugging Face folder of the decoder, adapters merged into the
                      weights (float32, HF names), readable by vlpre and by transformers
  text_encoder.json   how it embeds: template, pooling, causal (False: bidirectional,
                      LLM2Vec), append_eos, plus what it was tuned from and with, and the
                      weights' sha1

`find(name)` resolves a name: a folder holding `text_encoder.json`, or
`<RECIPES_DIR>/<name>/` ($VLPRE_TEXT_ENCODERS, default workdirs/text_encoders). Wherever
a text encoder is named (`config.text_encoder.name` of LIFT, cached and online,
`vlpre.embed`, `vlpre.methods.lift.text_score`), a recipe name works, and
`load_text_encoder` applies its settings; the embedding store's key holds `digest`, so a
re-tuned recipe under the same name never reuses stale embeddings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file
import tokenizers
from tokenizers import processors

from vlpre import storage
from vlpre.llm import checkpoints
from vlpre.llm.tokenizer import TextTokenizer

RECIPE_FILE = "text_encoder.json"
WEIGHTS_FILE = "model.safetensors"


def recipes_dir() -> str:
  """Where bare recipe names are looked up (and `save` writes by default)."""
  return os.environ.get("VLPRE_TEXT_ENCODERS", os.path.join("workdirs", "text_encoders"))


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A saved recipe (module docstring); `directory` is the HF folder to load."""
  directory: str
  template: str
  pooling: str
  causal: bool
  append_eos: bool
  digest: str  # sha1 of text_encoder.json (which holds the weights' sha1)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)


def find(name: str) -> Recipe | None:
  """The recipe `name` names (a recipe folder, or a name under `recipes_dir()`), or None."""
  if not name:
    return None
  for directory in (name, os.path.join(recipes_dir(), name)):
    path = os.path.join(directory, RECIPE_FILE)
    if os.path.isfile(path):
      raw = open(path, "rb").read()
      meta = json.loads(raw)
      return Recipe(directory=directory, template=meta["template"], pooling=meta["pooling"],
                    causal=bool(meta["causal"]), append_eos=bool(meta["append_eos"]),
                    digest=hashlib.sha1(raw).hexdigest(), meta=meta)
  return None


def _hf_tokenizer(tokenizer: TextTokenizer):
  """The tokenizer as transformers' fast tokenizer, special tokens as vlpre uses them, so
  `vlpre.llm.assets.read_hf_folder` reads back the same rows."""
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top  (heavy: saving only)
  backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())  # the caller's stays as is
  if tokenizer.prefix_ids:  # e.g. a BOS the GGUF's metadata asked for: make it the processor's
    special = [(backend.id_to_token(i), i) for i in tokenizer.prefix_ids]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(t for t, _ in special) + " $A", special_tokens=special)
  token = backend.id_to_token
  eos = token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
  return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos,
                                 pad_token=token(tokenizer.pad_id))


def save(directory: str, *, params: Any, hf_config: Any, tokenizer: TextTokenizer,
         template: str, pooling: str, causal: bool, append_eos: bool,
         tuned: dict[str, Any]) -> Recipe:
  """Writes a recipe folder (module docstring) and returns it as `find` reads it.

  Args:
    directory: the folder (created; files in it are replaced).
    params: the decoder's parameter tree, adapters already merged (vlpre.nn.lora.merge).
    hf_config: the base model's transformers config (the architecture).
    tokenizer: the base model's tokenizer (its backend and special tokens are saved).
    template, pooling, causal, append_eos: how the recipe embeds.
    tuned: what it was tuned from and with (base model, steps, loss, what trained...).
  """
  root = storage.path(directory)
  root.mkdir(parents=True, exist_ok=True)
  hf_config.save_pretrained(str(root))
  _hf_tokenizer(tokenizer).save_pretrained(str(root))
  state = checkpoints.params_to_state_dict(params)
  weights = os.path.join(str(root), WEIGHTS_FILE)
  save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, weights)
  sha1 = hashlib.sha1()
  with open(weights, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      sha1.update(chunk)
  meta = dict(template=template, pooling=pooling, causal=bool(causal),
              append_eos=bool(append_eos), weights_sha1=sha1.hexdigest(), tuned=tuned)
  storage.write_atomic(root / RECIPE_FILE, json.dumps(meta, indent=1, sort_keys=True))
  return find(str(root))
