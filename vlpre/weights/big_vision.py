"""big_vision `.npz` checkpoints ↔ vlpre: a ViT (`models/vit.py`) or a two-tower model
(`models/proj/image_text/two_towers.py`: `img`, `txt`, `t`, `b`).

big_vision's ViT is vlpre's layout under other names: the same flax kernels ([D, H, K]
q/k/v, [H, K, D] out), positions on the patches only (the cls token is concatenated
after), tanh-GELU, LayerNorm eps 1e-6, no LayerNorm before the blocks. What the file
does not say is read from what it holds: `MAPHead_0` → pool "map", `cls` → "cls"
(big_vision's "tok"), neither → "mean" ("gap"); no `pos_embedding` → sin-cos positions.
Its text transformer is bidirectional without a padding mask and pools the final
position (big_vision's pool_type="last", as SigLIP and LiT use): vlpre's pool="final".
Blocks are `encoderblock_<i>`, or one stacked `encoderblock` (scan=True).
Keys are "/"-joined paths, optionally under "params/".

Shape letters: D width, H heads, K per-head dim, N patches, L text positions, E embedding dim.
"""
from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from vlpre.weights import layout
from vlpre.weights.towers import Towers

NORM_EPS, ACT = 1e-6, "gelu_tanh"
# big_vision's Encoder1DBlock submodules → vlpre's EncoderBlock (layout.BLOCK).
BLOCK = {"LayerNorm_0": "ln_attn", "MultiHeadDotProductAttention_0/query": "attn/query",
         "MultiHeadDotProductAttention_0/key": "attn/key",
         "MultiHeadDotProductAttention_0/value": "attn/value",
         "MultiHeadDotProductAttention_0/out": "attn/out", "LayerNorm_1": "ln_mlp",
         "MlpBlock_0/Dense_0": "mlp/Dense_0", "MlpBlock_0/Dense_1": "mlp/Dense_1"}
MAP_HEAD = {"MultiHeadDotProductAttention_0/query": "query",
            "MultiHeadDotProductAttention_0/key": "key",
            "MultiHeadDotProductAttention_0/value": "value",
            "MultiHeadDotProductAttention_0/out": "out", "LayerNorm_0": "ln",
            "MlpBlock_0/Dense_0": "mlp/Dense_0", "MlpBlock_0/Dense_1": "mlp/Dense_1"}


def _get(tree: dict, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _renamed(tree: dict, names: dict[str, str]) -> dict:
  return layout.block_tree({ours: jax_tree(_get(tree, theirs)) for theirs, ours in names.items()})


def jax_tree(tree):
  return {k: np.asarray(v, np.float32) for k, v in tree.items()}


def _encoder_blocks(encoder: dict) -> list[dict]:
  if "encoderblock" in encoder:  # scan=True: one stacked block
    stacked = _renamed(encoder["encoderblock"], BLOCK)
    depth = next(iter(traverse_util.flatten_dict(stacked).values())).shape[0]
    return layout.blocks_of({"blocks": stacked}, depth)
  depth = len([k for k in encoder if re.fullmatch(r"encoderblock_\d+", k)])
  return [_renamed(encoder[f"encoderblock_{i}"], BLOCK) for i in range(depth)]


def _image(img: dict, source: str) -> tuple[dict, dict]:
  encoder = img["Transformer"]
  blocks = _encoder_blocks(encoder)
  query = blocks[0]["attn"]["query"]["kernel"]  # [D, H, K]
  width, heads = query.shape[0], query.shape[1]
  pool = "map" if "MAPHead_0" in img else "cls" if "cls" in img else "mean"
  options = dict(width=int(width), depth=len(blocks),
                 mlp_dim=int(blocks[0]["mlp"]["Dense_0"]["kernel"].shape[1]), num_heads=int(heads),
                 patch_size=int(img["embedding"]["kernel"].shape[0]), pool=pool,
                 posemb="learn" if "pos_embedding" in img else "sincos2d", pre_norm=False,
                 act=ACT, norm_eps=NORM_EPS)
  if img["embedding"]["kernel"].shape[0] != img["embedding"]["kernel"].shape[1]:
    raise ValueError(f"{source}: a non-square patch; vlpre's ViT has square patches")
  tree = {"patch_embed": jax_tree(img["embedding"]),
          "encoder": {"blocks": blocks, "ln_final": jax_tree(encoder["encoder_norm"])}}
  if "pos_embedding" in img:
    tree["pos_embedding"] = np.asarray(img["pos_embedding"], np.float32)
  if "cls" in img:
    tree["cls"] = np.asarray(img["cls"], np.float32)
  if pool == "map":
    head = img["MAPHead_0"]
    tree["map_head"] = {"probe": np.asarray(head["probe"], np.float32), **_renamed(head, MAP_HEAD)}
  return tree, options


def _text(txt: dict) -> tuple[dict, dict]:
  blocks = _encoder_blocks(txt["Encoder_0"])
  embedding = np.asarray(txt["Embed_0"]["embedding"], np.float32)
  query = blocks[0]["attn"]["query"]["kernel"]
  options = dict(vocab_size=int(embedding.shape[0]), max_len=int(txt["pos_embedding"].shape[1]),
                 width=int(embedding.shape[1]), depth=len(blocks),
                 mlp_dim=int(blocks[0]["mlp"]["Dense_0"]["kernel"].shape[1]),
                 num_heads=int(query.shape[1]), causal=False, pool="final", act=ACT,
                 norm_eps=NORM_EPS)
  tree = {"token_embed": {"embedding": embedding},
          "pos_embedding": np.asarray(txt["pos_embedding"], np.float32),
          "encoder": {"blocks": blocks, "ln_final": jax_tree(txt["Encoder_0"]["encoder_norm"])}}
  return tree, options


def read(path: str) -> Towers:
  """A big_vision ViT or two-tower `.npz` as Towers."""
  with np.load(path) as npz:
    flat = {k.removeprefix("params/"): npz[k] for k in npz.files}
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  source = f"{path} (big_vision)"
  if "img" not in tree:  # a plain ViT
    if "Transformer" not in tree:
      raise ValueError(f"{source}: neither a big_vision ViT (Transformer/...) nor a two-tower "
                       "model (img/..., txt/...)")
    image, options = _image(tree, source)
    return Towers(source, image, options)
  image, options = _image(tree["img"], source)
  img_head = tree["img"].get("head")
  towers = Towers(source, image, options,
                  image_head=None if img_head is None else jax_tree(img_head),
                  logit_scale=float(np.reshape(tree["t"], ())) if "t" in tree else None,
                  logit_bias=float(np.reshape(tree["b"], ())) if "b" in tree else None)
  if "txt" in tree:
    towers.text, towers.text_options = _text(tree["txt"])
    towers.text_head = jax_tree(tree["txt"]["head"]) if "head" in tree["txt"] else None
  return towers


def _blocks_out(prefix: str, blocks: list[dict]) -> dict[str, np.ndarray]:
  out = {}
  for i, block in enumerate(blocks):
    for theirs, ours in BLOCK.items():
      for k, v in layout.block_entry(block, ours).items():
        out[f"{prefix}/encoderblock_{i}/{theirs}/{k}"] = np.asarray(v, np.float32)
  return out


def write(towers: Towers, path: str) -> list[str]:
  """Writes `towers` as a big_vision `.npz` (two-tower names when it has a text tower);
  returns the keys."""
  img, o = towers.image, towers.image_options
  top = "img/" if towers.text is not None else ""
  out = {f"{top}embedding/{k}": np.asarray(v, np.float32) for k, v in img["patch_embed"].items()}
  if o["posemb"] == "learn":
    out[f"{top}pos_embedding"] = np.asarray(img["pos_embedding"], np.float32)
  if o["pool"] == "cls":
    out[f"{top}cls"] = np.asarray(img["cls"], np.float32)
  out.update(_blocks_out(f"{top}Transformer", img["encoder"]["blocks"]))
  out.update({f"{top}Transformer/encoder_norm/{k}": v for k, v in img["encoder"]["ln_final"].items()})
  if o["pool"] == "map":
    head = img["map_head"]
    out[f"{top}MAPHead_0/probe"] = np.asarray(head["probe"], np.float32)
    for theirs, ours in MAP_HEAD.items():
      out.update({f"{top}MAPHead_0/{theirs}/{k}": v
                  for k, v in layout.block_entry(head, ours).items()})
  if towers.image_head is not None:
    out.update({f"{top}head/{k}": v for k, v in towers.image_head.items()})
  if towers.text is not None:
    txt = towers.text
    out["txt/Embed_0/embedding"] = txt["token_embed"]["embedding"]
    out["txt/pos_embedding"] = txt["pos_embedding"]
    out.update(_blocks_out("txt/Encoder_0", txt["encoder"]["blocks"]))
    out.update({f"txt/Encoder_0/encoder_norm/{k}": v for k, v in txt["encoder"]["ln_final"].items()})
    out.update({f"txt/head/{k}": v for k, v in towers.text_head.items()})
    out["t"] = np.asarray([towers.logit_scale], np.float32)
    if towers.logit_bias is not None:
      out["b"] = np.asarray([towers.logit_bias], np.float32)
  np.savez(path, **{k: np.asarray(v, np.float32) for k, v in out.items()})
  return sorted(out)
