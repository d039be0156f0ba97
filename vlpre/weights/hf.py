"""Hugging Face transformers checkpoints ↔ vlpre: CLIPModel, SiglipModel (both ways),
Dinov2Model and SiglipVisionModel (read; vlpre.export writes those).

How the architectures map onto vlpre's towers (vlpre.nn.vit.ViT, vlpre.nn.text):
  CLIP     ViT: cls token, learned positions over cls + patches (the cls row is folded
           into the token: vlpre adds no position to it), pre_norm (`pre_layrnorm`), the
           patch conv without bias (a zero bias here), post_layernorm on the cls token
           (vlpre's final LayerNorm on every token: the same pooled feature), the
           visual_projection as the image head. Text: causal, pooled at the EOS token
           (vlpre: the last non-padding token, the same for CLIP's tokenizers), the
           text_projection as the head. LayerNorm eps and activation from the config.
  SigLIP   ViT: no cls token, learned positions, the attention-pooling head (vlpre's map
           head); no image projection (vlpre's two-tower image_head=False). Text:
           bidirectional, no padding mask, pooled at the final position (pool="final"),
           a head with a bias.
  DINOv2   ViT: cls token, LayerScale folded into the attention output and fc2 (exact:
           diag(λ)·(Wx + b)), exact-erf GELU; no text.

Files are read without torch where they are safetensors; pytorch_model.bin needs torch.
Shape letters: D width, E embedding dim, N patches, P patch size, L text positions.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

from vlpre.weights import layout
from vlpre.weights.towers import Towers

# hidden_act (transformers' ACT2FN names) ↔ vlpre.nn.layers.ACTIVATIONS.
ACT_FROM_HF = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
               "quick_gelu": "quick_gelu"}
ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}

# Per block: transformers submodule → vlpre's (layout.BLOCK).
CLIP_BLOCK = {"layer_norm1": "ln_attn", "self_attn.q_proj": "attn/query",
              "self_attn.k_proj": "attn/key", "self_attn.v_proj": "attn/value",
              "self_attn.out_proj": "attn/out", "layer_norm2": "ln_mlp",
              "mlp.fc1": "mlp/Dense_0", "mlp.fc2": "mlp/Dense_1"}  # SigLIP's too
DINOV2_BLOCK = {"norm1": "ln_attn", "attention.q_proj": "attn/query",
                "attention.k_proj": "attn/key", "attention.v_proj": "attn/value",
                "attention.o_proj": "attn/out", "norm2": "ln_mlp",
                "mlp.fc1": "mlp/Dense_0", "mlp.fc2": "mlp/Dense_1"}
# Older transformers (and vlpre.export's Dinov2Model) name DINOv2's attention so.
DINOV2_LEGACY = {"attention.q_proj": "attention.attention.query",
                 "attention.k_proj": "attention.attention.key",
                 "attention.v_proj": "attention.attention.value",
                 "attention.o_proj": "attention.output.dense"}
MODEL_TYPES = ("clip", "siglip", "dinov2", "siglip_vision_model")


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json"))


def load_state(path: str) -> dict[str, np.ndarray]:
  """A transformers folder's weights (safetensors, sharded or not, or pytorch_model.bin)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    state = {}
    for shard in sorted(set(json.load(open(index))["weight_map"].values())):
      state.update(load_file(os.path.join(path, shard)))
    return state
  if os.path.isfile(os.path.join(path, "model.safetensors")):
    return load_file(os.path.join(path, "model.safetensors"))
  if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    import torch  # pylint: disable=g-import-not-at-top  (optional: legacy .bin checkpoints only)
    return {k: v.float().numpy() for k, v in torch.load(
        os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True).items()}
  raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin")


def read(path: str) -> Towers:
  """A CLIPModel, SiglipModel, Dinov2Model or SiglipVisionModel folder as Towers."""
  config = json.load(open(os.path.join(path, "config.json")))
  kind = config.get("model_type")
  if kind not in MODEL_TYPES:
    raise ValueError(f"{path}: a Hugging Face '{kind}' checkpoint; vlpre reads {list(MODEL_TYPES)}")
  state = load_state(path)
  source = f"{path} ({kind})"
  if kind == "dinov2":
    return _read_dinov2(state, config, source)
  vision = config if kind == "siglip_vision_model" else config["vision_config"]
  prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
  if kind == "clip":
    image, options = _read_clip_vision(state, vision, prefix)
    text, text_options = _read_text(state, config["text_config"], causal=True)
    return Towers(source, image, options, image_head=_projection(state["visual_projection.weight"]),
                  text=text, text_options=text_options,
                  text_head=_projection(state["text_projection.weight"]),
                  logit_scale=float(state["logit_scale"].reshape(())))
  image, options = _read_siglip_vision(state, vision, prefix)
  if kind == "siglip_vision_model":
    return Towers(source, image, options)
  text, text_options = _read_text(state, config["text_config"], causal=False)
  head = layout.from_linear(state["text_model.head.weight"], state["text_model.head.bias"])
  return Towers(source, image, options, text=text, text_options=text_options, text_head=head,
                logit_scale=float(state["logit_scale"].reshape(())),
                logit_bias=float(state["logit_bias"].reshape(())))


def _projection(weight) -> dict:
  return layout.from_linear(weight)


def _act(config: dict) -> str:
  act = config.get("hidden_act", "gelu")
  if act not in ACT_FROM_HF:
    raise ValueError(f"hidden_act {act!r} has no vlpre activation ({sorted(ACT_FROM_HF)})")
  return ACT_FROM_HF[act]


def _blocks(state, prefix, depth, heads, names) -> list[dict]:
  def get(i):
    return lambda name: state.get(f"{prefix}{i}.{name}")
  return [layout.from_torch_block(get(i), names, heads) for i in range(depth)]


def _conv(weight, bias) -> dict:
  kernel_PxPx3xD = layout.f32(weight).transpose(2, 3, 1, 0)
  return {"kernel": kernel_PxPx3xD,
          "bias": np.zeros(kernel_PxPx3xD.shape[-1], np.float32) if bias is None else layout.f32(bias)}


def _vision_options(config: dict, **fixed) -> dict:
  return dict(width=config["hidden_size"], depth=config["num_hidden_layers"],
              mlp_dim=config["intermediate_size"], num_heads=config["num_attention_heads"],
              patch_size=config["patch_size"], posemb="learn", act=_act(config),
              norm_eps=float(config.get("layer_norm_eps", 1e-5)), **fixed)


def _read_clip_vision(state, config, prefix):
  options = _vision_options(config, pool="cls", pre_norm=True)
  e = f"{prefix}embeddings."
  pos_Nx1xD = layout.f32(state[f"{e}position_embedding.weight"])
  cls = layout.f32(state[f"{e}class_embedding"]) + pos_Nx1xD[0]
  image = {"patch_embed": _conv(state[f"{e}patch_embedding.weight"], None),
           "pos_embedding": pos_Nx1xD[1:][None], "cls": cls[None, None],
           "ln_pre": layout.from_norm(state[f"{prefix}pre_layrnorm.weight"],
                                      state[f"{prefix}pre_layrnorm.bias"]),
           "encoder": {"blocks": _blocks(state, f"{prefix}encoder.layers.", options["depth"],
                                         options["num_heads"], CLIP_BLOCK),
                       "ln_final": layout.from_norm(state[f"{prefix}post_layernorm.weight"],
                                                    state[f"{prefix}post_layernorm.bias"])}}
  return image, options


def _read_siglip_vision(state, config, prefix):
  use_head = config.get("vision_use_head", True)
  options = _vision_options(config, pool="map" if use_head else "mean", pre_norm=False)
  options["norm_eps"] = float(config.get("layer_norm_eps", 1e-6))
  e = f"{prefix}embeddings."
  image = {"patch_embed": _conv(state[f"{e}patch_embedding.weight"], state[f"{e}patch_embedding.bias"]),
           "pos_embedding": layout.f32(state[f"{e}position_embedding.weight"])[None],
           "encoder": {"blocks": _blocks(state, f"{prefix}encoder.layers.", options["depth"],
                                         options["num_heads"], CLIP_BLOCK),
                       "ln_final": layout.from_norm(state[f"{prefix}post_layernorm.weight"],
                                                    state[f"{prefix}post_layernorm.bias"])}}
  if use_head:
    h, heads = f"{prefix}head.", options["num_heads"]
    q_w, k_w, v_w = np.split(layout.f32(state[f"{h}attention.in_proj_weight"]), 3)
    q_b, k_b, v_b = np.split(layout.f32(state[f"{h}attention.in_proj_bias"]), 3)
    image["map_head"] = {
        "probe": layout.f32(state[f"{h}probe"]),
        "query": layout.from_linear(q_w, q_b, heads=heads),
        "key": layout.from_linear(k_w, k_b, heads=heads),
        "value": layout.from_linear(v_w, v_b, heads=heads),
        "out": layout.from_linear(state[f"{h}attention.out_proj.weight"],
                                  state[f"{h}attention.out_proj.bias"], heads=heads, heads_in=True),
        "ln": layout.from_norm(state[f"{h}layernorm.weight"], state[f"{h}layernorm.bias"]),
        "mlp": {"Dense_0": layout.from_linear(state[f"{h}mlp.fc1.weight"], state[f"{h}mlp.fc1.bias"]),
                "Dense_1": layout.from_linear(state[f"{h}mlp.fc2.weight"], state[f"{h}mlp.fc2.bias"])}}
  return image, options


def _read_text(state, config, *, causal: bool):
  options = dict(vocab_size=config["vocab_size"], max_len=config["max_position_embeddings"],
                 width=config["hidden_size"], depth=config["num_hidden_layers"],
                 mlp_dim=config["intermediate_size"], num_heads=config["num_attention_heads"],
                 causal=causal, pool="last" if causal else "final", act=_act(config),
                 norm_eps=float(config.get("layer_norm_eps", 1e-5 if causal else 1e-6)))
  t = "text_model."
  text = {"token_embed": {"embedding": layout.f32(state[f"{t}embeddings.token_embedding.weight"])},
          "pos_embedding": layout.f32(state[f"{t}embeddings.position_embedding.weight"])[None],
          "encoder": {"blocks": _blocks(state, f"{t}encoder.layers.", options["depth"],
                                        options["num_heads"], CLIP_BLOCK),
                      "ln_final": layout.from_norm(state[f"{t}final_layer_norm.weight"],
                                                   state[f"{t}final_layer_norm.bias"])}}
  return text, options


def _read_dinov2(state, config, source):
  if config.get("use_swiglu_ffn"):
    raise ValueError(f"{source}: a SwiGLU DINOv2 (giant); vlpre's ViT has a GELU MLP")
  width = config["hidden_size"]
  options = dict(width=width, depth=config["num_hidden_layers"],
                 mlp_dim=int(width * config.get("mlp_ratio", 4)),
                 num_heads=config["num_attention_heads"], patch_size=config["patch_size"],
                 pool="cls", posemb="learn", pre_norm=False, act=_act(config),
                 norm_eps=float(config.get("layer_norm_eps", 1e-6)))
  names = dict(DINOV2_BLOCK)
  if "encoder.layer.0.attention.attention.query.weight" in state:
    names = {DINOV2_LEGACY.get(k, k): v for k, v in names.items()}
  blocks = _blocks(state, "encoder.layer.", options["depth"], options["num_heads"], names)
  for i, block in enumerate(blocks):  # LayerScale: λ·(Wx + b) = (λW)x + λb
    for scale, dense in (("layer_scale1", block["attn"]["out"]),
                         ("layer_scale2", block["mlp"]["Dense_1"])):
      lam_D = layout.f32(state.get(f"encoder.layer.{i}.{scale}.lambda1", np.ones(width)))
      dense["kernel"] = dense["kernel"] * lam_D
      dense["bias"] = dense["bias"] * lam_D
  pos_1xNxD = layout.f32(state["embeddings.position_embeddings"])
  image = {"patch_embed": _conv(state["embeddings.patch_embeddings.projection.weight"],
                                state["embeddings.patch_embeddings.projection.bias"]),
           "pos_embedding": pos_1xNxD[:, 1:],
           "cls": layout.f32(state["embeddings.cls_token"]) + pos_1xNxD[:, :1],
           "encoder": {"blocks": blocks,
                       "ln_final": layout.from_norm(state["layernorm.weight"], state["layernorm.bias"])}}
  return Towers(source, image, options)


# --- vlpre → CLIPModel / SiglipModel --------------------------------------------------------

def _write_blocks(state, prefix, blocks):
  for i, block in enumerate(blocks):
    layout.put(state, f"{prefix}{i}", layout.torch_block(block, CLIP_BLOCK))


def _conv_to_torch(p: dict) -> np.ndarray:
  return layout.f32(p["kernel"]).transpose(3, 2, 0, 1)  # [D, 3, P, P]


def _tower_config(options: dict, *, image_size: int | None = None) -> dict:
  out = dict(hidden_size=options["width"], num_hidden_layers=options["depth"],
             intermediate_size=options["mlp_dim"], num_attention_heads=options["num_heads"],
             hidden_act=ACT_TO_HF[options["act"]], layer_norm_eps=options["norm_eps"],
             attention_dropout=0.0)
  if image_size is not None:
    out.update(image_size=image_size, patch_size=options["patch_size"], num_channels=3)
  return out


# What a CLIPModel / SiglipModel is, in the terms of `_architecture`.
CLIP = {"image pool": "cls", "image pre_norm": True, "text causal": True, "text pool": "last",
        "image head": True, "image head bias": False, "text head bias": False,
        "logit bias": False}
SIGLIP = {"image pool": "map", "image pre_norm": False, "text causal": False,
          "text pool": "final", "image head": False, "image head bias": False,
          "text head bias": True, "logit bias": True}


def _architecture(towers: Towers) -> dict:
  o, t = towers.image_options, towers.text_options or {}
  return {"image pool": o["pool"], "image pre_norm": o["pre_norm"],
          "text causal": t.get("causal"), "text pool": t.get("pool"),
          "image head": towers.image_head is not None,
          "image head bias": "bias" in (towers.image_head or {}),
          "text head bias": "bias" in (towers.text_head or {}),
          "logit bias": towers.logit_bias is not None,
          # one hidden_act and layer_norm_eps serve both towers' configs here
          "equal LayerNorm eps": o["norm_eps"] == t.get("norm_eps"),
          "equal activations": o["act"] == t.get("act")}


def problem(towers: Towers, kind: str) -> str | None:
  """Why `towers` is no `kind` ("CLIP" or "SigLIP") model (None: it is one)."""
  want = {**(CLIP if kind == "CLIP" else SIGLIP), "equal LayerNorm eps": True,
          "equal activations": True}
  have = _architecture(towers)
  wrong = [f"{k} {have[k]!r} ({kind}: {v!r})" for k, v in want.items() if have[k] != v]
  return "; ".join(wrong) or None


def to_clip(towers: Towers, image_size: int, eos_token_id: int):
  """(transformers.CLIPConfig, torch state dict as numpy) of a CLIP-shaped two-tower model."""
  from transformers import CLIPConfig  # pylint: disable=g-import-not-at-top  (heavy: export only)
  o, t, img = towers.image_options, towers.text_options, towers.image
  config = CLIPConfig(
      vision_config=_tower_config(o, image_size=image_size),
      text_config=dict(_tower_config(t), vocab_size=t["vocab_size"], max_position_embeddings=t["max_len"],
                       eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=None),
      projection_dim=int(towers.image_head["kernel"].shape[1]),
      logit_scale_init_value=towers.logit_scale, architectures=["CLIPModel"])
  pos_NxD = towers.image_positions(image_size)
  cls_D = layout.f32(img["cls"]).reshape(-1)
  if np.any(layout.f32(img["patch_embed"]["bias"])):
    # CLIP's patch conv has no bias: a constant added to every patch, folded into the
    # positions (the cls row stays zero: vlpre adds the bias to patches only).
    pos_NxD = pos_NxD + layout.f32(img["patch_embed"]["bias"])
  v, state = "vision_model.", {}
  state[f"{v}embeddings.class_embedding"] = cls_D
  state[f"{v}embeddings.patch_embedding.weight"] = _conv_to_torch(img["patch_embed"])
  state[f"{v}embeddings.position_embedding.weight"] = np.concatenate([np.zeros_like(pos_NxD[:1]), pos_NxD])
  layout.put(state, f"{v}pre_layrnorm", layout.to_norm(img["ln_pre"]))
  _write_blocks(state, f"{v}encoder.layers.", img["encoder"]["blocks"])
  layout.put(state, f"{v}post_layernorm", layout.to_norm(img["encoder"]["ln_final"]))
  _write_text(state, towers.text)
  state["visual_projection.weight"] = layout.to_linear(towers.image_head)["weight"]
  state["text_projection.weight"] = layout.to_linear(towers.text_head)["weight"]
  state["logit_scale"] = np.asarray(towers.logit_scale, np.float32)
  return config, state


def _write_text(state, text):
  t = "text_model."
  state[f"{t}embeddings.token_embedding.weight"] = layout.f32(text["token_embed"]["embedding"])
  state[f"{t}embeddings.position_embedding.weight"] = layout.f32(text["pos_embedding"])[0]
  _write_blocks(state, f"{t}encoder.layers.", text["encoder"]["blocks"])
  layout.put(state, f"{t}final_layer_norm", layout.to_norm(text["encoder"]["ln_final"]))


def to_siglip(towers: Towers, image_size: int, tokens: dict):
  """(transformers.SiglipConfig, torch state dict as numpy) of a SigLIP-shaped model;
  `tokens` are the text config's pad/eos/bos ids."""
  from transformers import SiglipConfig  # pylint: disable=g-import-not-at-top  (heavy: export only)
  o, t, img = towers.image_options, towers.text_options, towers.image
  head = towers.text_head
  config = SiglipConfig(
      vision_config=dict(_tower_config(o, image_size=image_size), vision_use_head=True),
      text_config=dict(_tower_config(t), vocab_size=t["vocab_size"],
                       max_position_embeddings=t["max_len"],
                       projection_size=int(head["kernel"].shape[1]), **tokens),
      architectures=["SiglipModel"])
  v, state = "vision_model.", {}
  state[f"{v}embeddings.patch_embedding.weight"] = _conv_to_torch(img["patch_embed"])
  state[f"{v}embeddings.patch_embedding.bias"] = layout.f32(img["patch_embed"]["bias"])
  state[f"{v}embeddings.position_embedding.weight"] = towers.image_positions(image_size)
  _write_blocks(state, f"{v}encoder.layers.", img["encoder"]["blocks"])
  layout.put(state, f"{v}post_layernorm", layout.to_norm(img["encoder"]["ln_final"]))
  write_map_head(state, f"{v}head", img["map_head"])
  _write_text(state, towers.text)
  layout.put(state, "text_model.head", layout.to_linear(head))
  state["logit_scale"] = np.asarray([towers.logit_scale], np.float32)
  state["logit_bias"] = np.asarray([towers.logit_bias], np.float32)
  return config, state


def write_map_head(state: dict, h: str, head: dict) -> None:
  """vlpre.nn.layers.MapHead → SiglipMultiheadAttentionPoolingHead under `h`."""
  q, k, v = (layout.to_linear(head[n]) for n in ("query", "key", "value"))
  state[f"{h}.probe"] = layout.f32(head["probe"])
  state[f"{h}.attention.in_proj_weight"] = np.concatenate([q["weight"], k["weight"], v["weight"]])
  state[f"{h}.attention.in_proj_bias"] = np.concatenate([q["bias"], k["bias"], v["bias"]])
  layout.put(state, f"{h}.attention.out_proj", layout.to_linear(head["out"], heads_in=True))
  layout.put(state, f"{h}.layernorm", layout.to_norm(head["ln"]))
  layout.put(state, f"{h}.mlp.fc1", layout.to_linear(head["mlp"]["Dense_0"]))
  layout.put(state, f"{h}.mlp.fc2", layout.to_linear(head["mlp"]["Dense_1"]))
