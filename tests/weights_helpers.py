"""Tiny randomly initialised source models (transformers, open_clip) for the public-weight
parity tests, and vlpre's features of converted weights."""
from __future__ import annotations

import importlib.machinery
import sys
import types

from flax import traverse_util
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import torch

from vlpre import methods
from vlpre.weights import towers as towers_lib


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
  """Random noise on every weight, so that LayerNorm scales, biases and the cls token
  (initialised to constants) are not what a wrong mapping would also give."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)


def import_open_clip():
  """open_clip, whose package imports torchvision for its image transforms and batch-norm
  freezing; neither is used by the model's forward. Where no torchvision matching the CPU
  torch is installed, a stand-in module takes its place for the import (the model code
  that runs is open_clip's own)."""
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except (ImportError, RuntimeError):
    _stand_in_torchvision()
  import open_clip  # pylint: disable=g-import-not-at-top
  return open_clip


def _stand_in_torchvision() -> None:
  class _Meta(type):
    def __getattr__(cls, name):
      return cls

  class _Anything(metaclass=_Meta):
    def __init__(self, *args, **kwargs):
      del args, kwargs

  class _Module(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return _Anything

  names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
           "torchvision.transforms.v2", "torchvision.ops", "torchvision.ops.misc")
  for name in names:
    sys.modules[name] = _Module(name)
    sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
  sys.modules["torchvision"].__path__ = []
  for name in names[1:]:
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, sys.modules[name])


def two_tower_config(model: dict, prefixes=()) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(model_name="two_tower", model=model,
                                        init_from=dict(weights="", prefixes=tuple(prefixes))))


def vlpre_params(config, towers):
  """(vlpre's model, the converted parameter tree for `config`)."""
  params = towers_lib.for_config(towers, config)
  model = methods.build_model(config.model_name, config.model.to_dict())
  return model, params


def check_shapes(model, params, batch: dict) -> None:
  """Every converted weight has the shape vlpre initialises (the model's other subtrees,
  e.g. a text tower a prefix left out, are not compared)."""
  abstract = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch)))["params"]
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()
          if k.split("/")[0] in params}
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  assert got == want


def nhwc(pixels_BxCxHxW: torch.Tensor) -> np.ndarray:
  return pixels_BxCxHxW.permute(0, 2, 3, 1).numpy()
