"""Exports a run's trained image tower as a Hugging Face transformers checkpoint.

    python -m vlpre.export --config=configs/clip.py:tiny --workdir=workdirs/clip_tiny --out=DIR

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
import os
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from vlpre import methods
from vlpre import storage
from vlpre.data import transforms
from vlpre.nn import layers
from vlpre.nn.vit import ViT, sincos_2d, vit_from_config

HIDDEN_ACT = "gelu_pytorch_tanh"  # layers.MlpBlock's nn.gelu defaults to the tanh approximation
# ViT fields the export maps, and those that do not change what inference computes
# (dropout is off; remat and scan change memory and compile time; the export is float32
# whatever the compute dtype). Any other field set away from its default is refused:
# a new ViT option must be mapped here before its towers can be exported.
MAPPED = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "pool", "posemb")
INFERENCE_NEUTRAL = ("dropout", "remat", "scan", "dtype")


def _linear(p: dict, *, heads_in: bool = False) -> dict[str, np.ndarray]:
  """A flax Dense/DenseGeneral → torch Linear's weight [out, in] and bias [out].

  q/k/v kernels are [D, H, K] (contract the first axis), the attention output's
  [H, K, D] (`heads_in`: contract all but the last).
  """
  kernel = np.asarray(p["kernel"], np.float32)
  w = kernel.reshape(-1, kernel.shape[-1]) if heads_in else kernel.reshape(kernel.shape[0], -1)
  out = {"weight": w.T}
  if "bias" in p:
    out["bias"] = np.asarray(p["bias"], np.float32).reshape(-1)
  return out


def _norm(p: dict) -> dict[str, np.ndarray]:
  return {"weight": np.asarray(p["scale"], np.float32), "bias": np.asarray(p["bias"], np.float32)}


def _put(state: dict, prefix: str, tensors: dict[str, np.ndarray]) -> None:
  state.update({f"{prefix}.{k}": v for k, v in tensors.items()})


# Per block: HF submodule → vlpre EncoderBlock submodule.
_DINOV2_BLOCK = {"norm1": "ln_attn", "attention.attention.query": "attn/query",
                 "attention.attention.key": "attn/key", "attention.attention.value": "attn/value",
                 "attention.output.dense": "attn/out", "norm2": "ln_mlp",
                 "mlp.fc1": "mlp/Dense_0", "mlp.fc2": "mlp/Dense_1"}
_SIGLIP_BLOCK = {"layer_norm1": "ln_attn", "self_attn.q_proj": "attn/query",
                 "self_attn.k_proj": "attn/key", "self_attn.v_proj": "attn/value",
                 "self_attn.out_proj": "attn/out", "layer_norm2": "ln_mlp",
                 "mlp.fc1": "mlp/Dense_0", "mlp.fc2": "mlp/Dense_1"}


def _put_blocks(state: dict, prefix: str, tower: dict, vit: ViT, names: dict[str, str]) -> None:
  """Every encoder block, from the scanned stack (leading depth axis) or block_i."""
  for i in range(vit.depth):
    block = (jax.tree.map(lambda x, i=i: x[i], tower["encoder"]["blocks"]) if vit.scan
             else tower["encoder"][f"block_{i}"])
    for hf, ours in names.items():
      module, sub = ours.split("/") if "/" in ours else (ours, None)
      p = block[module][sub] if sub else block[module]
      _put(state, f"{prefix}.{i}.{hf}",
           _norm(p) if ours.startswith("ln") else _linear(p, heads_in=ours == "attn/out"))


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
  _put(state, "embeddings.patch_embeddings.projection", conv)
  _put_blocks(state, "encoder.layer", tower, vit, _DINOV2_BLOCK)
  for i in range(vit.depth):
    for scale in ("layer_scale1", "layer_scale2"):
      state[f"encoder.layer.{i}.{scale}.lambda1"] = np.ones((vit.width,), np.float32)
  _put(state, "layernorm", _norm(tower["encoder"]["ln_final"]))
  return config, state


def _siglip(tower: dict, vit: ViT, common: dict, grid: int):
  from transformers import SiglipVisionConfig  # pylint: disable=g-import-not-at-top  (heavy: export only)
  config = SiglipVisionConfig(**common, intermediate_size=vit.mlp_dim, attention_dropout=0.0,
                              vision_use_head=vit.pool == "map",
                              architectures=["SiglipVisionModel"])
  conv, pos_NxD = _embeddings(tower, vit, grid)
  state = {"vision_model.embeddings.position_embedding.weight": pos_NxD}
  _put(state, "vision_model.embeddings.patch_embedding", conv)
  _put_blocks(state, "vision_model.encoder.layers", tower, vit, _SIGLIP_BLOCK)
  _put(state, "vision_model.post_layernorm", _norm(tower["encoder"]["ln_final"]))
  if vit.pool == "map":  # layers.MapHead → SiglipMultiheadAttentionPoolingHead
    head, h = tower["map_head"], "vision_model.head"
    q, k, v = (_linear(head[n]) for n in ("query", "key", "value"))
    state[f"{h}.probe"] = np.asarray(head["probe"], np.float32)
    state[f"{h}.attention.in_proj_weight"] = np.concatenate([q["weight"], k["weight"], v["weight"]])
    state[f"{h}.attention.in_proj_bias"] = np.concatenate([q["bias"], k["bias"], v["bias"]])
    _put(state, f"{h}.attention.out_proj", _linear(head["out"], heads_in=True))
    _put(state, f"{h}.layernorm", _norm(head["ln"]))
    _put(state, f"{h}.mlp.fc1", _linear(head["mlp"]["Dense_0"]))
    _put(state, f"{h}.mlp.fc2", _linear(head["mlp"]["Dense_1"]))
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


def restore_params(workdir: str, names: tuple[str, ...]) -> dict[str, Any]:
  """Top-level parameter subtrees of `workdir`'s latest checkpoint, as numpy arrays.

  As `train.load_from_workdir`, but onto this host's first device whatever mesh saved them
  (orbax's fallback sharding): without a target orbax rebuilds the saving topology, so a
  pod's (or 8 fake devices') checkpoint would not restore on a 1-device laptop.
  """
  directory = storage.path(workdir, what="workdir") / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"vlpre.export: no checkpoint in {directory}")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"vlpre.export: no checkpoint in {directory}")
    params = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=device)))["state"]["params"]
  missing = [n for n in names if n not in params]
  if missing:  # a run's checkpoint holds its trainable parameters only
    raise ValueError(f"vlpre.export: {directory} step {step} has no parameters {missing}; a frozen "
                     "tower (LiT) is exported from the run it came from (config.init_from.workdir)")
  return {n: jax.tree.map(np.asarray, params[n]) for n in names}


def export(config, workdir: str, out: str) -> Any:
  """Writes `out` (see the module docstring); returns the transformers config."""
  tower, vit = tower_of(config)
  params = restore_params(workdir, (tower.prefix, *tower.head.values()))
  image_size = int(config.input.image_size)
  grid = image_size // vit.patch_size
  if vit.posemb == "learn" and params[tower.prefix]["pos_embedding"].shape[1] != grid * grid:
    raise ValueError(f"vlpre.export: the checkpoint's position table does not fit the "
                     f"{grid}x{grid} patches of config.input.image_size")
  common = dict(hidden_size=vit.width, num_hidden_layers=vit.depth,
                num_attention_heads=vit.num_heads, image_size=image_size,
                patch_size=vit.patch_size, num_channels=3, hidden_act=HIDDEN_ACT,
                layer_norm_eps=layers.layer_norm(jnp.float32).epsilon)
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
  transformers.CLIPImageProcessor(  # resample 3: bicubic, as vlpre's ResizeCenterCrop
      size={"shortest_edge": int(config.input.get("resize_size") or image_size)},
      crop_size={"height": image_size, "width": image_size}, resample=3,
      image_mean=list(transforms.CLIP_MEAN), image_std=list(transforms.CLIP_STD),
  ).save_pretrained(out)
  head = {}
  for name, ours in tower.head.items():
    _put(head, name, _linear(params[ours]))
  save_file({k: np.ascontiguousarray(v) for k, v in head.items()},
            os.path.join(out, "head.safetensors"),
            metadata={"method": config.model_name, "formula": tower.formula})
  cls_first = vit.pool == "cls"
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(_CARD.format(
        cls=hf_config.architectures[0], method=config.model_name, workdir=workdir,
        head=tower.formula,
        pooled=_POOLED[vit.pool], tokens="[:, 1:] (after the cls token)" if cls_first else ""))


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


def main(argv, config_flag, workdir_flag, out_flag):
  del argv
  logging.set_verbosity(logging.INFO)
  export(config_flag.value, workdir_flag.value, out_flag.value)


if __name__ == "__main__":
  # Flags are defined here, not at import, as in vlpre.evaluate.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file of the run (configs/).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run: its latest checkpoint is exported.")
  _OUT = flags.DEFINE_string("out", None, "Output folder of the Hugging Face checkpoint.")
  flags.mark_flags_as_required(["config", "workdir", "out"])
  app.run(lambda argv: main(argv, _CONFIG, _WORKDIR, _OUT))
