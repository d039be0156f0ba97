"""Exports a run's trained image tower as a Hugging Face transformers checkpoint.

    python -m vlpre.export --workdir=workdirs/clip_tiny --out=DIR

The config is the one the run recorded in its config.json (vlpre/run_record.py), or
`--config=configs/...` as the run was started; `--config.x=y` overrides either.

DIR gets `config.json` + `model.safetensors` (the ViT: `AutoModel.from_pretrained(DIR)`),
`preprocessor_config.json` (vlpre's eval preprocessing as a CLIPImageProcessor),
`head.safetensors` (the method's head on the pooled feature, as its descriptor's
`export_tower` maps it: a projection, an MLP, a classifier's linear layer) and a README.md
saying where the pooled feature is and what the head computes.

vlpre's ViT (pre-LN blocks, a final LayerNorm over every token) maps onto a transformers
class chosen by its pooling:
  pool="cls"   → Dinov2Model: cls token, learned positions over cls + patches, final
                 LayerNorm on every token, pooler_output = the cls token; LayerScale is
                 written as 1. Not CLIPVisionModel: it adds a LayerNorm before the encoder
                 and leaves the patch tokens unnormed; not ViTModel: its pooler is
                 dense + tanh.
  pool="map" | "mean" | "none" → SiglipVisionModel: no cls token, the same final
                 LayerNorm, for map the attention-pooling head; for mean the pooled
                 feature is last_hidden_state.mean(1), which no transformers class returns.
Nothing else is loaded (no data, no text encoder, no torch); tests/test_export.py loads
every export with no missing, unexpected or mismatched weight and compares features.

Shape letters: N patches, D width, H heads, K per-head dim, P patch size, E embedding dim,
C classes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from vlpre import checkpoint
from vlpre import methods
from vlpre import run_record
from vlpre import storage
from vlpre.data import transforms
from vlpre.data import tokenizers
from vlpre.nn.vit import ViT, sincos_2d, vit_from_config
from vlpre.weights import hf
from vlpre.weights import layout
from vlpre.weights import open_clip
from vlpre.weights import towers as towers_lib

# ViT fields the export maps, and those that do not change what inference computes
# (dropout is off; remat and scan change memory and compile time; the export is float32
# whatever the compute dtype). Any other field set away from its default is refused:
# a new ViT option must be mapped here before its towers can be exported.
MAPPED = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "pool", "posemb", "act",
          "norm_eps")
INFERENCE_NEUTRAL = ("dropout", "remat", "scan", "dtype")


# Per block: HF submodule → vlpre EncoderBlock submodule.
_DINOV2_BLOCK = {hf.DINOV2_LEGACY.get(k, k): v for k, v in hf.DINOV2_BLOCK.items()}


def _put_blocks(state: dict, prefix: str, tower: dict, vit: ViT, names: dict[str, str]) -> None:
  """Every encoder block, from the scanned stack (leading depth axis) or block_i."""
  for i, block in enumerate(layout.blocks_of(tower["encoder"], vit.depth)):
    layout.put(state, f"{prefix}.{i}", layout.torch_block(block, names))


def _embeddings(tower: dict, vit: ViT, grid: int) -> tuple[dict, np.ndarray]:
  """The patch Conv2d (torch layout) and the position table [N, D] (sin-cos: as values)."""
  kernel_PxPx3xD = np.asarray(tower["patch_embed"]["kernel"], np.float32)
  conv = {"weight": kernel_PxPx3xD.transpose(3, 2, 0, 1),  # [D, 3, P, P]
          "bias": np.asarray(tower["patch_embed"]["bias"], np.float32)}
  if vit.posemb == "sincos2d":
    return conv, sincos_2d(grid, grid, vit.width)[0]
  return conv, np.asarray(tower["pos_embedding"], np.float32)[0]


def _dinov2(tower: dict, vit: ViT, common: dict, grid: int):
  from transformers import Dinov2Config  # pylint: disable=g-import-not-at-top  (heavy: export only)
  config = Dinov2Config(**common, mlp_ratio=vit.mlp_dim // vit.width, qkv_bias=True,
                        layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        drop_path_rate=0.0, architectures=["Dinov2Model"])
  conv, pos_NxD = _embeddings(tower, vit, grid)
  # vlpre adds positions to the patches only: the cls token's row is zero.
  zero_1xD = np.zeros_like(pos_NxD[:1])
  state = {"embeddings.cls_token": np.asarray(tower["cls"], np.float32),
           "embeddings.position_embeddings": np.concatenate([zero_1xD, pos_NxD])[None]}
  layout.put(state, "embeddings.patch_embeddings.projection", conv)
  _put_blocks(state, "encoder.layer", tower, vit, _DINOV2_BLOCK)
  for i in range(vit.depth):
    for scale in ("layer_scale1", "layer_scale2"):
      state[f"encoder.layer.{i}.{scale}.lambda1"] = np.ones((vit.width,), np.float32)
  layout.put(state, "layernorm", layout.to_norm(tower["encoder"]["ln_final"]))
  return config, state


def _siglip(tower: dict, vit: ViT, common: dict, grid: int):
  from transformers import SiglipVisionConfig  # pylint: disable=g-import-not-at-top  (heavy: export only)
  config = SiglipVisionConfig(**common, intermediate_size=vit.mlp_dim, attention_dropout=0.0,
                              vision_use_head=vit.pool == "map",
                              architectures=["SiglipVisionModel"])
  conv, pos_NxD = _embeddings(tower, vit, grid)
  state = {"vision_model.embeddings.position_embedding.weight": pos_NxD}
  layout.put(state, "vision_model.embeddings.patch_embedding", conv)
  _put_blocks(state, "vision_model.encoder.layers", tower, vit, hf.CLIP_BLOCK)
  layout.put(state, "vision_model.post_layernorm", layout.to_norm(tower["encoder"]["ln_final"]))
  if vit.pool == "map":  # layers.MapHead → SiglipMultiheadAttentionPoolingHead
    hf.write_map_head(state, "vision_model.head", tower["map_head"])
  return config, state


def tower_of(config) -> tuple[methods.ExportTower, ViT]:
  """The method's export tower (its descriptor's `export_tower`) and its (unbound) ViT; a
  one-line error for what HF cannot express."""
  tower = methods.of(config).export_tower
  if tower is None:
    exportable = sorted(m.name for m in methods.all_methods() if m.export_tower)
    raise ValueError(f"vlpre.export: method '{config.model_name}' has no exportable image tower "
                     f"(exportable: {exportable})")
  model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  if problem := tower.problem(model):
    raise ValueError(f"vlpre.export: {problem}")
  vit = vit_from_config(tower.options(model), jnp.float32)
  unmapped = [(f.name, getattr(vit, f.name)) for f in dataclasses.fields(ViT)
              if f.name not in (*MAPPED, *INFERENCE_NEUTRAL, "parent", "name")
              and getattr(vit, f.name) != f.default]
  if vit.posemb not in ("learn", "sincos2d"):
    unmapped.append(("posemb", vit.posemb))
  if unmapped:
    name, value = unmapped[0]
    raise ValueError(f"vlpre.export: ViT option {name}={value!r} has no Hugging Face equivalent")
  if vit.pool == "cls" and vit.mlp_dim % vit.width:  # FlaxDinov2 builds fc1 from an int ratio
    raise ValueError(f"vlpre.export: mlp_dim {vit.mlp_dim} is not a whole multiple of width "
                     f"{vit.width}; Dinov2Config (pool='cls') has only an integer mlp_ratio")
  return tower, vit


def export(config, workdir: str, out: str) -> Any:
  """Writes `out` (see the module docstring); returns the transformers config."""
  tower, vit = tower_of(config)
  params = checkpoint.restore_params(workdir, (tower.prefix, *tower.head.values()),
                                      what="vlpre.export")
  image_size = int(config.input.image_size)
  grid = image_size // vit.patch_size
  if vit.posemb == "learn" and params[tower.prefix]["pos_embedding"].shape[1] != grid * grid:
    raise ValueError(f"vlpre.export: the checkpoint's position table does not fit the "
                     f"{grid}x{grid} patches of config.input.image_size")
  common = dict(hidden_size=vit.width, num_hidden_layers=vit.depth,
                num_attention_heads=vit.num_heads, image_size=image_size,
                patch_size=vit.patch_size, num_channels=3, hidden_act=hf.ACT_TO_HF[vit.act],
                layer_norm_eps=vit.norm_eps)
  build = _dinov2 if vit.pool == "cls" else _siglip
  hf_config, state = build(params[tower.prefix], vit, common, grid)
  # Written without torch (a TPU VM rarely has it); "pt" is the layout of the names and
  # shapes (PyTorch's; transformers 5 has no other framework). transformers writes local
  # files only: a gs:// `out` is written in a local temporary directory, then uploaded.
  target = storage.path(out, what="export directory")
  with tempfile.TemporaryDirectory(prefix="vlpre-export-") as staging:
    _write_export(config, workdir, os.fspath(staging if storage.is_uri(target) else target),
                  tower, vit, params, hf_config, state, image_size)
    if storage.is_uri(target):
      storage.upload_dir(epath.Path(staging), target)
  logging.info("exported %s's %s-pooled tower as %s to %s", workdir, vit.pool,
               hf_config.architectures[0], target)
  return hf_config


def _write_export(config, workdir, out, tower, vit, params, hf_config, state, image_size):
  """The files of `export` in the local directory `out`."""
  import transformers  # pylint: disable=g-import-not-at-top  (heavy: export only)
  os.makedirs(out, exist_ok=True)
  hf_config.save_pretrained(out)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  image_processor(config, image_size).save_pretrained(out)
  head = {}
  for name, ours in tower.head.items():
    layout.put(head, name, layout.to_linear(params[ours]))
  record = tower.record(config) if tower.record else {}
  save_file({k: np.ascontiguousarray(v) for k, v in head.items()},
            os.path.join(out, "head.safetensors"),
            metadata={"method": config.model_name, "formula": tower.formula,
                      **{k: json.dumps(v) for k, v in record.items()}})
  cls_first = vit.pool == "cls"
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(_CARD.format(
        cls=hf_config.architectures[0], method=config.model_name, workdir=workdir,
        head=tower.formula,
        pooled=_POOLED[vit.pool], tokens="[:, 1:] (after the cls token)" if cls_first else ""))
    for key, value in record.items():  # e.g. the frozen text encoder and its recipe
      f.write(f"- {key} (also in head.safetensors' metadata): `{json.dumps(value)}`\n")


_POOLED = {"cls": "outputs.pooler_output (= last_hidden_state[:, 0], the cls token)",
           "map": "outputs.pooler_output (the attention-pooling head)",
           "mean": "outputs.last_hidden_state.mean(1) (no transformers class mean-pools)",
           "none": "none (pool='none')"}
_CARD = """# vlpre image tower ({method})

`python -m vlpre.export` of `{workdir}`: a `{cls}`; load it with `AutoModel`.

```python
from transformers import AutoImageProcessor, AutoModel
processor = AutoImageProcessor.from_pretrained(DIR)  # vlpre's eval resize, crop, CLIP normalisation
outputs = AutoModel.from_pretrained(DIR)(**processor(images, return_tensors="pt"))
```

- pooled feature (vlpre's `pre_logits`): {pooled}
- patch tokens (vlpre's `tokens`): outputs.last_hidden_state{tokens}
- `head.safetensors` (`safetensors.torch.load_file`): {head}
"""


def image_processor(config, image_size: int):
  """vlpre's eval preprocessing as a CLIPImageProcessor."""
  import transformers  # pylint: disable=g-import-not-at-top  (heavy: export only)
  return transformers.CLIPImageProcessor(  # resample 3: bicubic, as vlpre's ResizeCenterCrop
      size={"shortest_edge": int(config.input.get("resize_size") or image_size)},
      crop_size={"height": image_size, "width": image_size}, resample=3,
      image_mean=list(transforms.CLIP_MEAN), image_std=list(transforms.CLIP_STD))


# --- whole two-tower models -----------------------------------------------------------------

def model_towers(config, workdir: str) -> towers_lib.Towers:
  """The latest checkpoint's two towers (the method's descriptor `two_towers` says where)."""
  layout_ = methods.of(config).two_towers
  if layout_ is None:
    raise ValueError(f"vlpre.export: method '{config.model_name}' is no two-tower model; "
                     "--format=tower exports its image tower")
  model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  options = layout_.options(model)
  names = [layout_.image, layout_.text, layout_.text_head, layout_.logit_scale]
  names += [layout_.image_head] if options["image_head"] else []
  names += [layout_.logit_bias] if options["logit_bias"] else []
  params = checkpoint.restore_params(workdir, tuple(names), what="vlpre.export --workdir")
  return towers_lib.from_params(params, options["image"], options["text"], names=layout_,
                                source=workdir)


def export_model(config, workdir: str, out: str, fmt: str) -> str:
  """Writes the run as a whole model: fmt "hf" (a CLIPModel or SiglipModel folder, as its
  architecture is) or "open_clip"; returns what was written."""
  towers = model_towers(config, workdir)
  image_size = int(config.input.image_size)
  tokenizer = methods.build_tokenizer(config)
  if fmt == "open_clip":
    if problem := open_clip.problem(towers, image_size):
      raise ValueError(f"vlpre.export: the run is no open_clip CLIP: {problem}")
    kind = "open_clip"
  elif (clip := hf.problem(towers, "CLIP")) is None:
    kind = "CLIPModel"
  elif (siglip := hf.problem(towers, "SigLIP")) is None:
    kind = "SiglipModel"
  else:
    raise ValueError(f"vlpre.export: the run is neither a CLIPModel ({clip}) nor a SiglipModel "
                     f"({siglip}); --format=tower exports its image tower")
  target = storage.path(out, what="export directory")
  with tempfile.TemporaryDirectory(prefix="vlpre-export-") as staging:
    local = os.fspath(staging if storage.is_uri(target) else target)
    os.makedirs(local, exist_ok=True)
    if kind == "open_clip":
      preprocess = {"size": image_size, "mean": list(transforms.CLIP_MEAN),
                    "std": list(transforms.CLIP_STD), "interpolation": "bicubic",
                    "resize_mode": "shortest"}
      open_clip.write(towers, local, image_size, preprocess)
    else:
      _write_hf_model(config, towers, local, kind, image_size, tokenizer)
    with open(os.path.join(local, "README.md"), "w") as f:
      f.write(_MODEL_CARD[kind].format(workdir=workdir, method=config.model_name))
    if storage.is_uri(target):
      storage.upload_dir(epath.Path(staging), target)
  logging.info("exported %s as %s to %s", workdir, kind, target)
  return kind


def _write_hf_model(config, towers, out, kind, image_size, tokenizer) -> None:
  eos = getattr(tokenizer, "eos_id", None)
  if kind == "CLIPModel":
    hf_config, state = hf.to_clip(towers, image_size, eos_token_id=eos)
  else:
    hf_config, state = hf.to_siglip(towers, image_size, dict(
        pad_token_id=getattr(tokenizer, "pad_id", None), eos_token_id=eos,
        bos_token_id=getattr(tokenizer, "bos_id", None)))
  hf_config.save_pretrained(out)
  # np.array, not ascontiguousarray: that makes the 0-d logit_scale 1-d.
  save_file({k: np.array(v, order="C") for k, v in state.items()},
            os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  image_processor(config, image_size).save_pretrained(out)
  if isinstance(tokenizer, tokenizers.ClipBpeTokenizer):
    import transformers  # pylint: disable=g-import-not-at-top  (heavy: export only)
    vocab, merges = tokenizers.load_clip_vocab()
    transformers.CLIPTokenizer(
        vocab=vocab, merges=[tuple(m) for m in merges], unk_token=tokenizers.CLIP_EOT,
        bos_token=tokenizers.CLIP_SOT, eos_token=tokenizers.CLIP_EOT, pad_token="!",
        model_max_length=towers.text_options["max_len"]).save_pretrained(out)
  else:
    logging.warning("vlpre.export: tokenizer %s has no Hugging Face files; the folder has "
                    "none (bring the tokenizer the run used)", tokenizer)


_MODEL_CARD = {kind: f"""# vlpre two-tower model ({{method}})

`python -m vlpre.export --format={fmt}` of `{{workdir}}`: {what}
""" for kind, fmt, what in (
    ("CLIPModel", "hf", "a transformers `CLIPModel` with its tokenizer and image processor: "
     "`AutoModel.from_pretrained(DIR)`, `AutoProcessor.from_pretrained(DIR)`, or "
     "`pipeline(\"zero-shot-image-classification\", model=DIR)`."),
    ("SiglipModel", "hf", "a transformers `SiglipModel` with its tokenizer and image processor "
     "(texts padded to the model's length, as it was trained): "
     "`AutoModel.from_pretrained(DIR)`."),
    ("open_clip", "open_clip", "open_clip's hub format: "
     "`open_clip.create_model(\"local-dir:DIR\")`; texts tokenised as `open_clip.tokenize`."))}


def push_to_hub(out: str, repo_id: str) -> None:
  """Uploads the export folder to the Hugging Face Hub (a machine with a network and a token)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top  (optional: --push_to_hub only)
  huggingface_hub.HfApi().create_repo(repo_id, exist_ok=True)
  huggingface_hub.HfApi().upload_folder(folder_path=out, repo_id=repo_id)


FORMATS = ("tower", "hf", "open_clip")


def main(argv, config_flag, workdir_flag, out_flag, format_flag, hub_flag):
  del argv
  logging.set_verbosity(logging.INFO)
  if format_flag.value not in FORMATS:
    raise app.UsageError(f"--format={format_flag.value}: one of {FORMATS}")
  if hub_flag.value and storage.is_uri(storage.path(out_flag.value, what="export directory")):
    raise app.UsageError("--push_to_hub uploads a local --out folder")
  if format_flag.value == "tower":
    export(config_flag.value, workdir_flag.value, out_flag.value)
  else:
    export_model(config_flag.value, workdir_flag.value, out_flag.value, format_flag.value)
  if hub_flag.value:
    push_to_hub(out_flag.value, hub_flag.value)


if __name__ == "__main__":
  # Flags are defined here, not at import, as in vlpre.evaluate.
  _CONFIG = run_record.define_config_flag(sys.argv)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run: its latest checkpoint is exported.")
  _OUT = flags.DEFINE_string("out", None, "Output folder of the Hugging Face checkpoint.")
  _FORMAT = flags.DEFINE_string(
      "format", "tower", "tower: the image tower and head (AutoModel); hf: a two-tower run as "
      "a CLIPModel or SiglipModel; open_clip: a two-tower run in open_clip's hub format.")
  _HUB = flags.DEFINE_string("push_to_hub", "", "Hub repository id (user/name) to upload the "
                             "export to (needs a network and a Hugging Face token).")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(lambda argv: main(argv, _CONFIG, _WORKDIR, _OUT, _FORMAT, _HUB))
