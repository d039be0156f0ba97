"""Model registry: a method's model is a file here that defines a Linen `Model`.

The config names it (`config.model_name = "two_tower"`) and passes `config.model` as its
keyword arguments. A model's `__call__(batch, *, train)` returns a dict of outputs that
the configured losses read; `embed_image` / `embed_text` (where they exist) serve the
evaluators. A model file may also define `load_pretrained(model_config, params)`, which
returns the parameter tree with pretrained weights placed in it.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

import jax.numpy as jnp


def get_model_module(name: str) -> ModuleType:
  try:
    return importlib.import_module(f"vlpre.models.{name}")
  except ModuleNotFoundError as e:
    if e.name == f"vlpre.models.{name}":
      raise ValueError(f"no model '{name}': expected a file vlpre/models/{name}.py") from e
    raise


def build_model(name: str, kwargs: dict, dtype=None):
  module = get_model_module(name)
  kwargs = dict(kwargs)
  if dtype is not None:
    kwargs["dtype"] = dtype
  return module.Model(**kwargs)


@dataclasses.dataclass
class Built:
  """A method's model with what the trainer needs beside it."""
  model: Any
  # Subtrees of pretrained weights placed after init, e.g. {"txt_encoder": llm_params}.
  pretrained: dict[str, Any] | None = None
  # Logical axis names (trees of tuples) for parameter subtrees whose module does not
  # annotate them, e.g. a Hugging Face checkpoint's layout: {"txt_encoder": axes_tree}.
  logical_axes: dict[str, Any] | None = None


@dataclasses.dataclass
class InputExtras:
  """A method's additions to the input pipeline (see data.build_train_dataset)."""
  transforms: tuple = ()   # grain transforms run per example, after the standard ones
  keys: tuple = ()         # fields they add that go into the batch
  tokenize: bool = True    # False: captions are not tokenised (e.g. cached text embeddings)


def input_extras(config) -> InputExtras:
  module = get_model_module(config.model_name)
  if hasattr(module, "input_extras"):
    return module.input_extras(config)
  return InputExtras()


def build(config) -> Built:
  """`config.model_name` → its file's `build(config)` if it has one, else `Model(**config.model)`."""
  module = get_model_module(config.model_name)
  if hasattr(module, "build"):
    return module.build(config)
  return Built(build_model(config.model_name, config.model.to_dict()
                           if hasattr(config.model, "to_dict") else config.model,
                           dtype=jnp.dtype(config.get("dtype", "float32"))))


def build_tokenizer(config):
  """The text tokenizer of the input pipeline and the text evaluators (None: no text).

  A model file may define `build_tokenizer(config)` (a frozen LLM brings its own);
  otherwise `config.tokenizer.name` picks one from vlpre.data.tokenizers.
  """
  module = get_model_module(config.model_name)
  if hasattr(module, "build_tokenizer"):
    return module.build_tokenizer(config)
  if not config.get("tokenizer"):
    return None
  from vlpre.data import tokenizers  # pylint: disable=g-import-not-at-top
  kwargs = dict(config.tokenizer)
  return tokenizers.get_tokenizer(kwargs.pop("name"), **kwargs)
