"""Methods: a method's model is a file vlpre/models/<name>.py that the config names.

`config.model_name = "two_tower"` picks the file; `config.model` holds its keyword
arguments. What a method file provides, resolved by `get_method` (the one place where
the defaults are decided):

  Model                              required. A Linen module whose
                                     `__call__(batch, *, train) -> dict` returns the
                                     outputs the configured losses read; `embed_image` /
                                     `embed_text`, where defined, serve the evaluators.
  build(config) -> Built             optional. Default: `Model(**config.model)` in
                                     `config.dtype`, nothing pretrained.
  input_extras(config) -> InputExtras  optional. Default: `InputExtras()`, the standard
                                     pipeline with tokenised captions.
  build_tokenizer(config)            optional. Default: the tokenizer `config.tokenizer`
                                     names (vlpre.data.tokenizers), None without one.

The trainer and the evaluators call `build`, `input_extras` and `build_tokenizer` below,
never the file directly, so a method file defines only what differs from the defaults.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import TYPE_CHECKING, Any, Callable

import jax.numpy as jnp

if TYPE_CHECKING:
  import grain


@dataclasses.dataclass
class Built:
  """A method's model with what the trainer needs beside it."""
  model: Any
  # Subtrees of pretrained weights placed after init, e.g. {"txt_encoder": llm_params}.
  pretrained: dict[str, Any] | None = None
  # Logical axis names (trees of tuples) for parameter subtrees whose module does not
  # annotate them, e.g. a Hugging Face checkpoint's layout: {"txt_encoder": axes_tree}.
  logical_axes: dict[str, Any] | None = None
  # The pretrained LLM (vlpre.llm.LLM) a captioning model decodes with; the captioning
  # evaluator and the vlpre-captioner describer generate through it.
  llm: Any = None


@dataclasses.dataclass
class InputExtras:
  """A method's additions to the input pipeline (see data.build_train_dataset)."""
  transforms: tuple = ()   # grain transforms run per example, after the standard ones
  keys: tuple = ()         # fields they add that go into the batch
  tokenize: bool = True    # False: captions are not tokenised (e.g. cached text embeddings)
  # Transformation of the whole record stream, after bad records are dropped and before
  # batching, e.g. packing token sequences into rows with segment ids and positions:
  # `lambda ds: grain.experimental.FirstFitPackIterDataset(ds, length_struct=...,
  # num_packing_bins=..., meta_features=("__key__", "_num_bad"))`. None: records are
  # batched as they come.
  stream: Callable[[grain.IterDataset], grain.IterDataset] | None = None
  # Host-side function of each training batch (numpy dict → numpy dict), applied by the
  # trainer before the batch goes to devices, e.g. trimming token padding to a length
  # bucket (vlpre.data.text_batching.TrimTextPadding). None: batches go as they come.
  batch_transform: Callable[[dict], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A method file resolved: every member of the protocol above, defaults filled in."""
  name: str
  Model: type  # pylint: disable=invalid-name  (the file's class, under its own name)
  build: Callable[[Any], Built]
  input_extras: Callable[[Any], InputExtras]
  build_tokenizer: Callable[[Any], Any]


def _config_dict(d) -> dict:
  return d.to_dict() if hasattr(d, "to_dict") else dict(d)


def _default_build(model_cls: type, config) -> Built:
  kwargs = {**_config_dict(config.model), "dtype": jnp.dtype(config.get("dtype", "float32"))}
  return Built(model_cls(**kwargs))


def _default_input_extras(config) -> InputExtras:
  del config
  return InputExtras()


def _default_build_tokenizer(config):
  if not config.get("tokenizer"):
    return None
  from vlpre.data import tokenizers  # pylint: disable=g-import-not-at-top
  kwargs = dict(config.tokenizer)
  return tokenizers.get_tokenizer(kwargs.pop("name"), **kwargs)


_OPTIONAL = ("build", "input_extras", "build_tokenizer")


def get_method(name: str) -> Method:
  """Imports vlpre/models/<name>.py and resolves it against the protocol above."""
  try:
    module = importlib.import_module(f"vlpre.models.{name}")
  except ModuleNotFoundError as e:
    if e.name == f"vlpre.models.{name}":
      raise ValueError(f"no model '{name}': expected a file vlpre/models/{name}.py") from e
    raise
  if not isinstance(getattr(module, "Model", None), type):
    raise ValueError(f"vlpre/models/{name}.py is not a method file: it defines no `Model` class")
  for member in _OPTIONAL:
    if hasattr(module, member) and not callable(getattr(module, member)):
      raise ValueError(f"vlpre/models/{name}.py: `{member}` must be a function of the config")
  defaults = {"build": functools.partial(_default_build, module.Model),
              "input_extras": _default_input_extras,
              "build_tokenizer": _default_build_tokenizer}
  return Method(name=name, Model=module.Model,
                **{member: getattr(module, member, defaults[member]) for member in _OPTIONAL})


def build_model(name: str, kwargs: dict, dtype=None):
  """`Model(**kwargs)` of method `name`, bypassing its `build` (tests, tools)."""
  kwargs = dict(kwargs)
  if dtype is not None:
    kwargs["dtype"] = dtype
  return get_method(name).Model(**kwargs)


def build(config) -> Built:
  """The model of `config.model_name`, with pretrained subtrees and their logical axes."""
  return get_method(config.model_name).build(config)


def input_extras(config) -> InputExtras:
  """The method's additions to the input pipeline."""
  return get_method(config.model_name).input_extras(config)


def build_tokenizer(config):
  """The text tokenizer of the input pipeline and the text evaluators (None: no text)."""
  return get_method(config.model_name).build_tokenizer(config)
