"""Methods: each is a folder vlpre/methods/<name>/ whose `__init__.py` defines `METHOD`.

`config.model_name` names the method: a folder here ("two_tower", "lift", ...), one of a
method's `aliases` ("classifier" is GPT4Image's), or a dotted module path outside the
package ("mypkg.mymethod"), imported as it is, so a method can live in its user's own
repository. `config.model` holds the keyword arguments of its model.

A method's `METHOD = Method(...)` says everything the method-agnostic tools need:

  name, Model                  required. `Model` is a Linen module whose
                               `__call__(batch, *, train) -> dict` returns the outputs the
                               configured losses read; `embed_image` / `embed_text`, where
                               defined, serve the evaluators.
  build(config) -> Built       default: `Model(**config.model)` in `config.dtype`.
  input_extras(config) -> InputExtras   default: the standard pipeline, tokenised captions.
  build_tokenizer(config)      default: the tokenizer `config.tokenizer` names, or None.
  reads_embedding_store(config) -> bool   whether the run reads the frozen-text store that
                               `vlpre.embed` builds first; default: the config names a
                               `text_encoder`.
  losses                       name → loss function (vlpre.losses' signature) the method adds
                               to the shared ones.
  pretrained                   the config fields naming a pretrained model (`--check`
                               validates each before anything is built).
  export_tower                 where its ViT sits, for `vlpre.export` and for public ViT
                               weights (init_from.weights) (None: not exportable).
  two_towers                   a contrastive image-text model's layout, for whole-model
                               export (CLIPModel, SiglipModel, open_clip) and public
                               two-tower weights (None: not such a model).
  compare                      its runs in `make compare` (vlpre.compare).
  notebook                     its Colab notebook (notebooks/build_notebooks.py).

The trainer, check, export, compare, the losses and the notebooks discover methods through
`get` and `all_methods` below; nothing keeps a list of methods by hand.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax.numpy as jnp

from vlpre.data import tokenizers

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
  # The method builds the training record stream itself, in place of the source that
  # `config.input` names and the per-example transforms (e.g. interleaved documents,
  # tokenized): `records(config.input, *, seed, tokenizer, process_index, process_count,
  # host_batch) -> (this host's records as a grain.MapDataset, a stream transform or
  # None)`, applied before `stream`. None: image-caption (or labelled) samples.
  records: Callable[..., tuple[grain.MapDataset, Callable | None]] | None = None


@dataclasses.dataclass(frozen=True)
class PretrainedField:
  """A config field naming a pretrained model: `config.<section>.<field>`, where `section`
  may be dotted ("hive.llm": an LLM section, vlpre.llm.SECTION); `used(config)` says
  whether the run loads it (None: whenever the field is set). The section also holds
  `allow_download` and `revision` for hub ids (vlpre.llm.assets.resolve). `recipes`: the
  field may also name a saved text-encoder recipe (vlpre.text_encoders.recipes)."""
  section: str
  field: str
  used: Callable[[Any], bool] | None = None
  recipes: bool = False


@dataclasses.dataclass(frozen=True)
class ExportTower:
  """Where a method keeps its ViT, for vlpre.export: the parameter subtree, the ViT options
  as the method's own setup builds them from config.model, its head on the pooled feature
  (torch Linear name → vlpre Dense), what the head computes (for the export's README), and
  `problem(model_config)`: why a config's tower cannot be exported (None: it can)."""
  prefix: str
  options: Callable[[dict], dict]
  head: dict[str, str]
  formula: str
  problem: Callable[[dict], str | None] = lambda model: None
  # What the export records beside the tower, from the run's config (a JSON-able dict,
  # e.g. the frozen text encoder the head was trained against and its recipe).
  record: Callable[[Any], dict] | None = None


@dataclasses.dataclass(frozen=True)
class TwoTowers:
  """A contrastive image-text model's layout (vlpre.weights): `options(model_config)` gives
  {"image": ViT kwargs, "text": TextTransformer kwargs, "embed_dim", "image_head",
  "image_head_bias", "text_head_bias" (bools), "logit_bias" (whether it learns one)}, as the
  method builds them; the rest name its parameter subtrees."""
  options: Callable[[dict], dict]
  image: str = "img"
  image_head: str = "img_head"  # absent when options' image_head is False
  text: str = "txt"
  text_head: str = "txt_head"
  logit_scale: str = "t_prime"  # log of the scale
  logit_bias: str = "logit_bias"


@dataclasses.dataclass(frozen=True)
class CompareRun:
  """One run of `make compare` (vlpre.compare --run): its title in the table, its folder
  under the comparison's root, and the commands that produce it, in order. Each command
  is a tuple of argv words after `python -m`, in which these are filled in:
    {steps} {root} {dir}   --steps, --out (the comparison's root), root/folder
    {opt:NAME=DEFAULT}     the value of `--option=<method name>.NAME=VALUE`, else DEFAULT
                           (which may hold {steps} {root} {dir}; `{opt:NAME}`: else empty)
    {arg:NAME}             `,NAME=VALUE` when that option is given, else nothing: one more
                           option of a config argument, `--config=configs/x.py:tiny{arg:NAME}`
  A method's options are the NAMEs its commands use; `--option` with any other is an error."""
  title: str
  folder: str
  commands: tuple[tuple[str, ...], ...]
  order: int = 100  # position in the table (smaller first)


@dataclasses.dataclass(frozen=True)
class Method:
  """A method's descriptor (module docstring). Unset callables get the defaults below."""
  name: str
  Model: type  # pylint: disable=invalid-name  (the method's model class, under its own name)
  build: Callable[[Any], Built] | None = None
  input_extras: Callable[[Any], InputExtras] | None = None
  build_tokenizer: Callable[[Any], Any] | None = None
  reads_embedding_store: Callable[[Any], bool] | None = None
  losses: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  aliases: tuple[str, ...] = ()
  pretrained: tuple[PretrainedField, ...] = ()
  export_tower: ExportTower | None = None
  two_towers: TwoTowers | None = None
  compare: tuple[CompareRun, ...] = ()
  notebook: str | None = None  # the notebook's file stem under notebooks/ (None: none)

  def __post_init__(self):
    if not isinstance(self.Model, type):
      raise ValueError(f"method {self.name!r}: `Model` must be a class, got {self.Model!r}")
    defaults = {"build": functools.partial(_default_build, self.Model),
                "input_extras": _default_input_extras,
                "build_tokenizer": _default_build_tokenizer,
                "reads_embedding_store": _default_reads_embedding_store}
    for member, default in defaults.items():
      value = getattr(self, member)
      if value is None:
        object.__setattr__(self, member, default)
      elif not callable(value):
        raise ValueError(f"method {self.name!r}: `{member}` must be a function of the config")
    object.__setattr__(self, "losses", dict(self.losses))


def _config_dict(d) -> dict:
  return d.to_dict() if hasattr(d, "to_dict") else dict(d)


def _default_build(model_cls: type, config) -> Built:
  kwargs = {**_config_dict(config.model), "dtype": jnp.dtype(config.get("dtype", "float32"))}
  return Built(model_cls(**kwargs))


def _default_input_extras(config) -> InputExtras:
  del config
  return InputExtras()


def _default_reads_embedding_store(config) -> bool:
  return bool(config.get("text_encoder"))


def _default_build_tokenizer(config):
  if not config.get("tokenizer"):
    return None
  kwargs = dict(config.tokenizer)
  return tokenizers.get_tokenizer(kwargs.pop("name"), **kwargs)


def _import_descriptor(module_name: str, shown: str) -> Method:
  module = importlib.import_module(module_name)
  method = getattr(module, "METHOD", None)
  if not isinstance(method, Method):
    raise ValueError(f"{shown} is not a method: it defines no `METHOD = vlpre.methods.Method(...)`")
  return method


def folder_names() -> list[str]:
  """The method folders inside vlpre/methods, sorted."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


@functools.cache
def all_methods() -> tuple[Method, ...]:
  """Every method of the package (each folder's METHOD), sorted by name."""
  return tuple(_import_descriptor(f"{__name__}.{name}", f"vlpre/methods/{name}")
               for name in folder_names())


@functools.cache
def get(name: str) -> Method:
  """The method `config.model_name` names: a folder, an alias, or a dotted module path."""
  if not name:
    raise ValueError("model_name is empty: name a method folder "
                     f"({', '.join(folder_names())}) or a module path 'mypkg.mymethod'")
  if "." in name:  # a method outside the package, imported by its module path
    try:
      return _import_descriptor(name, f"module {name!r}")
    except ModuleNotFoundError as e:
      if name == e.name or name.startswith(f"{e.name}."):
        raise ValueError(f"no method module {name!r} (not importable: {e})") from e
      raise
  if name in folder_names():
    return _import_descriptor(f"{__name__}.{name}", f"vlpre/methods/{name}")
  for method in all_methods():
    if name in method.aliases:
      return method
  raise ValueError(f"no method '{name}': expected a folder vlpre/methods/{name}/ "
                   f"(methods: {', '.join(folder_names())}) or a module path 'mypkg.mymethod'")


def of(config) -> Method:
  """The method of a run's config."""
  return get(config.model_name)


def build_model(name: str, kwargs: dict, dtype=None):
  """`Model(**kwargs)` of method `name`, bypassing its `build` (tests, tools)."""
  kwargs = dict(kwargs)
  if dtype is not None:
    kwargs["dtype"] = dtype
  return get(name).Model(**kwargs)


def build(config) -> Built:
  """The model of `config.model_name`, with pretrained subtrees and their logical axes."""
  return of(config).build(config)


def input_extras(config) -> InputExtras:
  """The method's additions to the input pipeline."""
  return of(config).input_extras(config)


def build_tokenizer(config):
  """The text tokenizer of the input pipeline and the text evaluators (None: no text)."""
  return of(config).build_tokenizer(config)
