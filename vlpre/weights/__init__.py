"""Public weights in and whole models out: converters between vlpre's parameter trees and
open_clip, Hugging Face transformers and big_vision checkpoints.

    --config.init_from.weights=PATH   (format read from PATH; docs/training.md)

  a folder with config.json               a transformers CLIPModel, SiglipModel, Dinov2Model
                                          or SiglipVisionModel (vlpre.weights.hf)
  a folder with open_clip_config.json     open_clip's hub format (vlpre.weights.open_clip)
  a .pt / .bin / .safetensors file        an open_clip state dict; its model config is
                                          init_from.open_clip_model (a name or a JSON file)
  a .npz file                             a big_vision ViT or two-tower model (vlpre.weights.big_vision)

`load(config)` returns the method's parameter subtrees (vlpre.weights.towers.for_config),
which the trainer places like any pretrained weights; a checkpoint whose architecture
differs from config.model is refused with one line naming the fields to set.
"""
from __future__ import annotations

import os
from typing import Any

from vlpre.weights import big_vision
from vlpre.weights import hf
from vlpre.weights import open_clip
from vlpre.weights.towers import Towers, for_config

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def read(path: str, open_clip_model: str = "") -> Towers:
  """The checkpoint at `path` (module docstring) as Towers."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, open_clip.CONFIG_FILE)):
      return open_clip.read(path)
    if hf.is_checkpoint(path):
      return hf.read(path)
    raise ValueError(f"{path}: a folder without config.json (Hugging Face) or "
                     f"{open_clip.CONFIG_FILE} (open_clip)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist")
  if path.endswith(".npz"):
    return big_vision.read(path)
  if path.endswith(STATE_DICT_SUFFIXES):
    return open_clip.read(path, open_clip_model)
  raise ValueError(f"{path}: not a public checkpoint vlpre reads (a Hugging Face or open_clip "
                   f"folder, an open_clip state dict {STATE_DICT_SUFFIXES}, a big_vision .npz)")


def load(config) -> dict[str, Any]:
  """`config.init_from.weights` as the method's parameter subtrees."""
  init = config.init_from
  towers = read(os.path.expanduser(init.weights), init.get("open_clip_model", ""))
  return for_config(towers, config)
