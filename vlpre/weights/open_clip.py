"""open_clip checkpoints ↔ vlpre: a state dict (.pt / .bin / .safetensors) with its model
config (an open_clip model name such as "ViT-B-32", or a JSON file), and the folder
open_clip's hub format holds (`open_clip_config.json` + `open_clip_model.safetensors`,
which `open_clip.create_model("local-dir:DIR")` loads).

open_clip's own ViT and text transformer map onto vlpre's towers as CLIP does
(vlpre.weights.hf): pre_norm (`ln_pre`), the cls position folded into the token, a
bias-free patch conv, `ln_post` as the final LayerNorm, `proj` / `text_projection` as the
heads ([D, E], already flax's layout), the text pooled at its EOS token (open_clip's
argmax: the EOS id is the vocabulary's largest). LayerNorm eps 1e-5, activation QuickGELU
for the "-quickgelu" / OpenAI models, else exact GELU. Models with a timm or Hugging Face
tower, LayerScale, attentional pooling or other pooling are refused with one line.

Shape letters: D width, E embedding dim, L text positions, N patches.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
from safetensors.numpy import load_file, save_file

from vlpre.weights import layout
from vlpre.weights.towers import Towers

# Per block: open_clip's ResidualAttentionBlock submodule → vlpre's (q/k/v come packed).
BLOCK = {"ln_1": "ln_attn", "attn.out_proj": "attn/out", "ln_2": "ln_mlp",
         "mlp.c_fc": "mlp/Dense_0", "mlp.c_proj": "mlp/Dense_1"}
NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which open_clip's towers use
# Config fields of towers vlpre's ViT and text transformer do not express.
UNSUPPORTED = {"vision_cfg": ("timm_model_name", "ls_init_value", "attentional_pool",
                              "no_ln_pre", "final_ln_after_pool", "attn_pooler_queries"),
               "text_cfg": ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask",
                            "proj_bias", "proj_type")}
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


def model_config(model: str) -> dict:
  """An open_clip model config: a JSON file, or a name from open_clip's model_configs
  (found without importing open_clip, which needs torchvision)."""
  if os.path.isfile(model):
    config = json.load(open(model))
    return config.get("model_cfg", config)
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"open_clip model {model!r}: give the config as a JSON file "
                     "(open_clip is not installed to look the name up)")
  path = os.path.join(spec.submodule_search_locations[0], "model_configs", f"{model}.json")
  if not os.path.isfile(path):
    raise ValueError(f"open_clip has no model config {model!r} (a name as in "
                     "open_clip.list_models(), or a JSON file)")
  return json.load(open(path))


def load_state(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    state = load_file(path)
  else:
    import torch  # pylint: disable=g-import-not-at-top  (optional: .pt/.bin checkpoints only)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k: v.float().numpy() for k, v in state.items()}
  return {k.removeprefix("module."): v for k, v in state.items()}


def _check(config: dict, source: str) -> None:
  for section, fields in UNSUPPORTED.items():
    if bad := [f for f in fields if config.get(section, {}).get(f)]:
      raise ValueError(f"{source}: open_clip {section}.{bad[0]} has no vlpre equivalent")
  pool = config.get("vision_cfg", {}).get("pool_type", "tok")
  text_pool = config.get("text_cfg", {}).get("pool_type", "argmax")
  if pool != "tok" or text_pool != "argmax":
    raise ValueError(f"{source}: open_clip pooling {pool}/{text_pool}; vlpre maps tok/argmax")


def _blocks(state, prefix, depth, heads) -> list[dict]:
  blocks = []
  for i in range(depth):
    p = f"{prefix}{i}."
    block = layout.from_torch_block(lambda n, p=p: state.get(p + n), BLOCK, heads)
    for name, w, b in zip(("query", "key", "value"),
                          np.split(layout.f32(state[f"{p}attn.in_proj_weight"]), 3),
                          np.split(layout.f32(state[f"{p}attn.in_proj_bias"]), 3)):
      block["attn"][name] = layout.from_linear(w, b, heads=heads)
    blocks.append(block)
  return blocks


def read(path: str, model: str = "") -> Towers:
  """An open_clip state dict (`model`: its config name or JSON) or hub-format folder."""
  if os.path.isdir(path):
    config, state = model_config(os.path.join(path, CONFIG_FILE)), load_state(os.path.join(path, WEIGHTS_FILE))
  elif not model:
    raise ValueError(f"{path}: an open_clip state dict needs its model config "
                     "(init_from.open_clip_model: a name such as ViT-B-32, or a JSON file)")
  else:
    config, state = model_config(model), load_state(path)
  source = f"{path} (open_clip)"
  _check(config, source)
  v, t = config["vision_cfg"], config["text_cfg"]
  act = "quick_gelu" if config.get("quick_gelu") else "gelu"
  width, t_width = v["width"], t["width"]
  image_options = dict(width=width, depth=v["layers"], mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
                       num_heads=width // v.get("head_width", 64), patch_size=v["patch_size"],
                       pool="cls", posemb="learn", pre_norm=True, act=act, norm_eps=NORM_EPS)
  text_options = dict(vocab_size=t.get("vocab_size", 49408), max_len=t.get("context_length", 77),
                      width=t_width, depth=t["layers"], mlp_dim=int(t_width * t.get("mlp_ratio", 4.0)),
                      num_heads=t.get("heads", 8), causal=True, pool="last", act=act,
                      norm_eps=NORM_EPS)
  pos_NxD = layout.f32(state["visual.positional_embedding"])
  image = {"patch_embed": {"kernel": layout.f32(state["visual.conv1.weight"]).transpose(2, 3, 1, 0),
                           "bias": np.zeros(width, np.float32)},
           "pos_embedding": pos_NxD[1:][None],
           "cls": (layout.f32(state["visual.class_embedding"]) + pos_NxD[0])[None, None],
           "ln_pre": layout.from_norm(state["visual.ln_pre.weight"], state["visual.ln_pre.bias"]),
           "encoder": {"blocks": _blocks(state, "visual.transformer.resblocks.", v["layers"],
                                         image_options["num_heads"]),
                       "ln_final": layout.from_norm(state["visual.ln_post.weight"],
                                                    state["visual.ln_post.bias"])}}
  text = {"token_embed": {"embedding": layout.f32(state["token_embedding.weight"])},
          "pos_embedding": layout.f32(state["positional_embedding"])[None],
          "encoder": {"blocks": _blocks(state, "transformer.resblocks.", t["layers"],
                                        text_options["num_heads"]),
                      "ln_final": layout.from_norm(state["ln_final.weight"], state["ln_final.bias"])}}
  bias = state.get("logit_bias")
  return Towers(source, image, image_options, image_head={"kernel": layout.f32(state["visual.proj"])},
                text=text, text_options=text_options,
                text_head={"kernel": layout.f32(state["text_projection"])},
                logit_scale=float(np.reshape(state["logit_scale"], ())),
                logit_bias=None if bias is None else float(np.reshape(bias, ())))


def problem(towers: Towers, image_size: int) -> str | None:
  """Why `towers` is no open_clip CLIP (None: it is one)."""
  o, t = towers.image_options, towers.text_options or {}
  wrong = []
  if o["pool"] != "cls" or not o["pre_norm"]:
    wrong.append("the image tower needs pool='cls' and pre_norm=True")
  if not t.get("causal") or t.get("pool") != "last":
    wrong.append("the text tower needs causal=True and pool='last'")
  if (towers.image_head is None or "bias" in towers.image_head
      or "bias" in (towers.text_head or {})):
    wrong.append("open_clip has an image projection and a bias-free text projection")
  acts = {o["act"], t.get("act")}
  if acts not in ({"quick_gelu"}, {"gelu"}):
    wrong.append(f"open_clip's activation is QuickGELU or exact GELU in both towers, not {sorted(acts)}")
  if {o["norm_eps"], t.get("norm_eps")} != {NORM_EPS}:
    wrong.append(f"open_clip's LayerNorm eps is {NORM_EPS}")
  if o["width"] % o["num_heads"]:
    wrong.append("open_clip's image heads are width / head_width")
  if image_size % o["patch_size"]:
    wrong.append(f"image size {image_size} is no multiple of the patch size")
  return "; ".join(wrong) or None


def write(towers: Towers, out: str, image_size: int, preprocess: dict) -> dict:
  """`out`/open_clip_config.json + open_clip_model.safetensors; returns the model config."""
  o, t, img = towers.image_options, towers.text_options, towers.image
  config = {"embed_dim": int(towers.image_head["kernel"].shape[1]),
            "quick_gelu": o["act"] == "quick_gelu",
            "vision_cfg": {"image_size": image_size, "layers": o["depth"], "width": o["width"],
                           "patch_size": o["patch_size"], "head_width": o["width"] // o["num_heads"],
                           "mlp_ratio": o["mlp_dim"] / o["width"]},
            "text_cfg": {"context_length": t["max_len"], "vocab_size": t["vocab_size"],
                         "width": t["width"], "heads": t["num_heads"], "layers": t["depth"],
                         "mlp_ratio": t["mlp_dim"] / t["width"]}}
  if towers.logit_bias is not None:
    config["init_logit_bias"] = towers.logit_bias
  # The patch conv has no bias: vlpre's, a constant on every patch, joins the positions.
  pos_NxD = towers.image_positions(image_size) + layout.f32(img["patch_embed"]["bias"])
  state = {"visual.class_embedding": layout.f32(img["cls"]).reshape(-1),
           "visual.positional_embedding": np.concatenate([np.zeros_like(pos_NxD[:1]), pos_NxD]),
           "visual.conv1.weight": layout.f32(img["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
           "visual.proj": layout.f32(towers.image_head["kernel"]),
           "token_embedding.weight": layout.f32(towers.text["token_embed"]["embedding"]),
           "positional_embedding": layout.f32(towers.text["pos_embedding"])[0],
           "text_projection": layout.f32(towers.text_head["kernel"]),
           "logit_scale": np.asarray(towers.logit_scale, np.float32)}
  if towers.logit_bias is not None:
    state["logit_bias"] = np.asarray(towers.logit_bias, np.float32)
  layout.put(state, "visual.ln_pre", layout.to_norm(img["ln_pre"]))
  layout.put(state, "visual.ln_post", layout.to_norm(img["encoder"]["ln_final"]))
  layout.put(state, "ln_final", layout.to_norm(towers.text["encoder"]["ln_final"]))
  for prefix, tower in (("visual.transformer.resblocks.", img), ("transformer.resblocks.", towers.text)):
    for i, block in enumerate(tower["encoder"]["blocks"]):
      p = f"{prefix}{i}"
      layout.put(state, p, layout.torch_block(block, BLOCK))
      qkv = [layout.to_linear(block["attn"][n]) for n in ("query", "key", "value")]
      state[f"{p}.attn.in_proj_weight"] = np.concatenate([x["weight"] for x in qkv])
      state[f"{p}.attn.in_proj_bias"] = np.concatenate([x["bias"] for x in qkv])
  os.makedirs(out, exist_ok=True)
  save_file({k: np.array(v, order="C") for k, v in state.items()},
            os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    json.dump({"model_cfg": config, "preprocess_cfg": preprocess}, f, indent=2)
  return config
