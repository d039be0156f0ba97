"""Public weights in vlpre's layout, and where a method's parameters take them.

Every converter (vlpre.weights.hf, .open_clip, .big_vision) reads its format into
`Towers` and writes its format from one: the image ViT (vlpre.nn.vit.ViT's parameters,
its blocks as a list), optionally a text tower (vlpre.nn.text.TextTransformer's), the
heads and the logit scale/bias, with the model options the weights fix (`image_options`,
`text_options`: the ViT and TextTransformer fields that must match the config).

`for_config` places them: a method with `two_towers` takes every part it has, one with an
`export_tower` takes the image tower (an image-only method, a ViT classifier), and `init_from.prefixes`,
when set, keeps only those parameter subtrees (LiT: the image tower and its head).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlpre import methods
from vlpre.nn import vit as vit_lib
from vlpre.nn.text import TextTransformer
from vlpre.weights import layout

# The ViT and text-tower fields a checkpoint fixes; the rest (scan, remat, dropout,
# attention kernel, dtype) change nothing it computes.
VIT_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "pool", "posemb",
              "pre_norm", "act", "norm_eps")
TEXT_FIELDS = ("vocab_size", "max_len", "width", "depth", "mlp_dim", "num_heads", "causal",
               "pool", "act", "norm_eps")


@dataclasses.dataclass
class Towers:
  """One model's weights in vlpre's layout (module docstring).

  image: the ViT's parameters with `encoder` = {"blocks": [per-block trees], "ln_final"};
    the cls token holds its position (vlpre adds none to it).
  image_head: {"kernel": [D, E]} (a projection) or None (SigLIP: the pooled feature is the
    embedding).
  text, text_head: the same for the text tower; text_head may have a bias.
  logit_scale: log of the scale (vlpre's t'); logit_bias: SigLIP's b, else None.
  """
  source: str
  image: dict
  image_options: dict
  image_head: dict | None = None
  text: dict | None = None
  text_options: dict | None = None
  text_head: dict | None = None
  logit_scale: float | None = None
  logit_bias: float | None = None

  def image_positions(self, image_size: int) -> np.ndarray:
    """The patch position table [N, D] (sin-cos positions as values)."""
    o = self.image_options
    if o["posemb"] == "sincos2d":
      grid = image_size // o["patch_size"]
      return vit_lib.sincos_2d(grid, grid, o["width"])[0]
    return layout.f32(self.image["pos_embedding"])[0]

  def two_tower_options(self) -> dict:
    """The two-tower model fields the weights fix (methods.TwoTowers.options' keys)."""
    embed = (self.image_head["kernel"].shape[1] if self.image_head is not None
             else self.image_options["width"])
    return dict(embed_dim=int(embed), image_head=self.image_head is not None,
                image_head_bias="bias" in (self.image_head or {}),
                text_head_bias="bias" in (self.text_head or {}),
                logit_bias=self.logit_bias is not None)


def vit_options(options: dict) -> dict:
  """Every VIT_FIELDS value of a config's ViT options (a 'variant' decoded, defaults filled)."""
  vit = vit_lib.vit_from_config(options, jnp.float32)
  return {f: getattr(vit, f) for f in VIT_FIELDS} | {"scan": vit.scan}


def text_options(options: dict) -> dict:
  text = TextTransformer(**options)
  return {f: getattr(text, f) for f in TEXT_FIELDS} | {"scan": text.scan}


def _differences(label: str, theirs: dict, ours: dict) -> list[str]:
  return [f"{label}{k}={theirs[k]!r} (config: {ours.get(k)!r})" for k in theirs
          if k in ours and theirs[k] != ours[k]]


def _tower(tree: dict, scan: bool) -> dict:
  encoder = tree["encoder"]
  return {**tree, "encoder": layout.encoder(encoder["blocks"], encoder["ln_final"], scan=scan)}


def for_config(towers: Towers, config, what: str = "init_from.weights") -> dict[str, Any]:
  """The method's parameter subtrees ({name: tree}) from `towers`; a one-line ValueError
  naming every model field the weights need set otherwise."""
  method = methods.of(config)
  model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  prefixes = tuple(config.init_from.get("prefixes", ()) or ())
  if method.two_towers is not None:
    layout_ = method.two_towers
    options = layout_.options(model)
    image, text = vit_options(options["image"]), text_options(options["text"])
    problems = _differences("image.", towers.image_options, image)
    wanted = (layout_.image, layout_.image_head)
    if towers.text is not None and not set(prefixes) <= set(wanted):
      problems += _differences("text.", towers.text_options, text)
      problems += _differences("", towers.two_tower_options(), options)
    elif towers.image_head is not None and options["image_head"]:
      fixed = towers.two_tower_options()
      problems += _differences("", {k: fixed[k] for k in ("embed_dim", "image_head_bias")}, options)
    if problems:
      raise ValueError(f"{what}: {towers.source} does not fit config.model: "
                       + ", ".join(problems))
    out = {layout_.image: _tower(towers.image, image["scan"])}
    if towers.image_head is not None and options["image_head"]:
      out[layout_.image_head] = towers.image_head
    if towers.text is not None:
      out[layout_.text] = _tower(towers.text, text["scan"])
      out[layout_.text_head] = towers.text_head
      out[layout_.logit_scale] = towers.logit_scale
      if towers.logit_bias is not None:
        out[layout_.logit_bias] = towers.logit_bias
  elif method.export_tower is not None:
    image = vit_options(method.export_tower.options(model))
    if problems := _differences("", towers.image_options, image):
      raise ValueError(f"{what}: {towers.source} does not fit the image tower of config.model: "
                       + ", ".join(problems))
    out = {method.export_tower.prefix: _tower(towers.image, image["scan"])}
  else:
    raise ValueError(f"{what}: method '{config.model_name}' has no ViT to load public weights into")
  if prefixes:
    if missing := [p for p in prefixes if p not in out]:
      raise ValueError(f"{what}: {towers.source} has no parameters for init_from.prefixes {missing}")
    out = {p: out[p] for p in prefixes}
  return out


def from_params(params: dict, image: dict, text: dict | None, *, names: Any = None,
                source: str = "vlpre") -> Towers:
  """A vlpre run's parameters as Towers (export): `image`/`text` are the towers' options,
  `names` the method's methods.TwoTowers (None: `params` is {"img": vit params})."""
  def tower(tree, depth):
    return {**tree, "encoder": {"blocks": layout.blocks_of(tree["encoder"], depth),
                                "ln_final": tree["encoder"]["ln_final"]}}
  image_options = vit_options(image)
  if names is None:
    return Towers(source, tower(params["img"], image_options["depth"]), image_options)
  text_options_ = text_options(text)
  bias = params.get(names.logit_bias)
  return Towers(
      source, tower(params[names.image], image_options["depth"]), image_options,
      image_head=params.get(names.image_head),
      text=tower(params[names.text], text_options_["depth"]), text_options=text_options_,
      text_head=params[names.text_head], logit_scale=float(params[names.logit_scale]),
      logit_bias=None if bias is None else float(bias))
