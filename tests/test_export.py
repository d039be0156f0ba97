"""vlpre.export: a trained tower as a transformers checkpoint that computes vlpre's features.

Each case trains a tiny run for 2 steps with the real `train.run`, exports it, loads it with
`AutoModel.from_pretrained` (PyTorch: transformers 5 has no Flax models) and compares on
real Flickr8k val images, preprocessed by vlpre's eval pipeline:
  clip        pool=cls, learned positions, scanned  → Dinov2Model
  siglip      pool=map, unrolled blocks             → SiglipVisionModel with its MAP head
  lift        pool=mean, sin-cos positions, MLP head → SiglipVisionModel without a head
  classifier  ViT backbone, pool=cls, unrolled      → Dinov2Model
and checks the head (head.safetensors) against vlpre's embed_image / classify.
"""
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
import torch
from transformers import AutoImageProcessor, AutoModel

from vlpre import checkpoint, export, methods, train
from vlpre.data import eval_input
from vlpre.nn.vit import ViT
from vlpre.text_encoders import store as store_lib

from tests import helpers

TOL = 1e-4
IMAGE, RESIZE = 32, 36  # tiny_clip_config's sizes
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(data_dir, shard, cifar_shard, case):
  c = helpers.tiny_clip_config(data_dir, total_steps=2)
  c.input.train = shard
  c.evals = {}
  if case == "siglip":
    c.model.image = dict(c.model.image, pool="map", scan=False)
    c.model.update(logit_scale_init=float(np.log(10.0)), logit_bias_init=-10.0)
    c.losses = {"siglip": 1.0}
  elif case == "lift":
    c.model_name = "lift"
    c.model = dict(image=dict(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=8,
                              posemb="sincos2d"), head_hidden=48)
    del c["tokenizer"]
    c.text_encoder = dict(name="minilm-l6", max_len=16, pooling="", normalize=True,
                          template="{text}", layer=-1, center=False, dtype="float32")
    c.text_mode = "cached"
    c.text_cache = os.path.join(os.path.dirname(shard), "store")
    c.frozen = ("txt_encoder/.*", "txt_mean")
    c.min_fsdp_size = 2**16
  elif case == "classifier":  # GPT4Image's CE-only baseline with a ViT backbone
    c.model_name = "classifier"
    c.model = dict(num_classes=10, backbone="vit", vit=dict(c.model.image, scan=False))
    c.input.train, c.input.label = cifar_shard, True
    del c["tokenizer"]
    c.text_loss_weight = 0.0
    c.losses = {"softmax_ce": 1.0}
  return c


@pytest.fixture(scope="module")
def shard(data_dir, tmp_path_factory):
  return helpers.small_shard(data_dir, tmp_path_factory.mktemp("export"), num_samples=16)


@pytest.fixture(scope="module")
def cifar_shard(data_dir, tmp_path_factory):
  return helpers.small_shard(data_dir, tmp_path_factory.mktemp("export_cifar"),
                             pattern="cifar10/train-00000.tar", num_samples=16)


@pytest.fixture(scope="module")
def images(data_dir):
  """8 Flickr8k val images through vlpre's eval preprocessing, and their raw JPEG bytes."""
  batch = next(eval_input.iterate_eval("flickr8k/val-*.tar", image_size=IMAGE, resize_size=RESIZE,
                                     batch_size=8, data_dir=data_dir, max_examples=8))
  raw = {}
  with tarfile.open(os.path.join(data_dir, "flickr8k", "val-00000.tar")) as tar:
    for member in tar:
      key, ext = member.name.split(".", 1)
      if key in batch["_key"] and ext in ("jpg", "jpeg", "png", "webp"):
        raw[key] = tar.extractfile(member).read()
  return batch["image"], [raw[k] for k in batch["_key"]]


@pytest.fixture(scope="module")
def trained(data_dir, shard, cifar_shard, tmp_path_factory):
  """case → (config, workdir, export dir): each case trained and exported once per module."""
  cache = {}

  def get(case):
    if case not in cache:
      config = _config(data_dir, shard, cifar_shard, case)
      if case == "lift":
        store_lib.build_store(config, progress=False)
      base = tmp_path_factory.mktemp(case)
      workdir, out = str(base / "run"), str(base / "hf")
      train.run(config, workdir)
      export.export(config, workdir, out)
      cache[case] = config, workdir, out
    return cache[case]

  return get


def _vlpre_features(config, workdir, image_BxHxWx3):
  """vlpre's own outputs: ViT.encode (pooled, tokens) and the head's output (the method's
  embed_image zimg, or the classifier's logits)."""
  tower, vit = export.tower_of(config)
  names = {"two_tower": ("img", "img_head", "txt", "txt_head", "t_prime"),
           "lift": ("img", "head_in", "head_out", "t_prime"),
           "classifier": ("vit", "head")}[config.model_name]
  if config.model.get("logit_bias_init") is not None:
    names += ("logit_bias",)
  params = checkpoint.restore_params(workdir, names)
  encoded = vit.apply({"params": params[tower.prefix]}, image_BxHxWx3, method=ViT.encode,
                      all_levels=False)
  if config.model_name == "lift":
    model = methods.build_model("lift", dict(config.model, text_dim=384))
    params["txt_mean"] = np.zeros((384,), np.float32)  # declared by the model, unused here
  else:
    model = methods.build_model(config.model_name, dict(config.model))
  embedded = model.apply({"params": params}, image_BxHxWx3, method=type(model).embed_image)
  np.testing.assert_array_equal(embedded["pre_logits"], encoded["pooled"])
  head_BxE = (model.apply({"params": params}, image_BxHxWx3, method=type(model).classify)
              if config.model_name == "classifier" else embedded["zimg"])
  return np.asarray(encoded["pooled"]), np.asarray(encoded["tokens"]), np.asarray(head_BxE)


def _apply_head(out_dir, pooled_BxD):
  """head.safetensors applied as its README formula says, in PyTorch."""
  h = load_file(os.path.join(out_dir, "head.safetensors"))
  x = torch.as_tensor(pooled_BxD)
  if "proj.weight" in h:
    return (x @ h["proj.weight"].T).numpy()
  if "classifier.weight" in h:
    return (x @ h["classifier.weight"].T + h["classifier.bias"]).numpy()
  hidden = torch.nn.functional.gelu(x @ h["fc1.weight"].T + h["fc1.bias"], approximate="tanh")
  return (hidden @ h["fc2.weight"].T + h["fc2.bias"]).numpy()


def _max_diff(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(a - b).max())


@pytest.mark.integration
@pytest.mark.parametrize("case", ["clip", "siglip", "lift", "classifier"])
def test_exported_tower_gives_vlpres_features(case, trained, images):
  config, workdir, out = trained(case)

  image_BxHxWx3, raw = images
  pooled_BxD, tokens_BxNxD, zimg_BxE = _vlpre_features(config, workdir, image_BxHxWx3)
  pixels_Bx3xHxW = np.ascontiguousarray(image_BxHxWx3.transpose(0, 3, 1, 2))
  model, loading = AutoModel.from_pretrained(out, output_loading_info=True)
  assert not any(loading.values()), loading  # every weight mapped, none left at random init
  model.eval()
  with torch.no_grad():
    hf = model(pixel_values=torch.from_numpy(pixels_Bx3xHxW))
  hidden = hf.last_hidden_state.numpy()
  expected_class = {"clip": "Dinov2Model", "siglip": "SiglipVisionModel",
                    "lift": "SiglipVisionModel", "classifier": "Dinov2Model"}[case]
  assert type(model).__name__ == expected_class
  if expected_class == "Dinov2Model":  # the cls token leads, vlpre's tokens are the patches
    hf_pooled, hf_tokens = hf.pooler_output.numpy(), hidden[:, 1:]
    np.testing.assert_array_equal(hf_pooled, hidden[:, 0])
  elif case == "siglip":
    hf_pooled, hf_tokens = hf.pooler_output.numpy(), hidden
  else:
    assert hf.pooler_output is None and not model.config.vision_use_head
    hf_pooled, hf_tokens = hidden.mean(1), hidden
  assert _max_diff(hf_pooled, pooled_BxD) <= TOL
  assert _max_diff(hf_tokens, tokens_BxNxD) <= TOL
  assert _max_diff(_apply_head(out, hf_pooled), zimg_BxE) <= TOL
  assert np.abs(pooled_BxD).max() > 0.1  # a real signal, not zeros on both sides

  # The bundled image processor is vlpre's eval preprocessing (bicubic resize of the
  # shorter side, centre crop, CLIP normalisation): the same pixels from the same JPEGs.
  processor = AutoImageProcessor.from_pretrained(out)
  processed = processor([Image.open(io.BytesIO(b)).convert("RGB") for b in raw],
                        return_tensors="np")["pixel_values"]
  assert _max_diff(processed, pixels_Bx3xHxW) <= TOL
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["hidden_act"] == "gelu_pytorch_tanh"
  assert "pooled" in open(os.path.join(out, "README.md")).read().lower()
  if case == "lift":  # the frozen text encoder the head was trained against, and its recipe
    with safe_open(os.path.join(out, "head.safetensors"), "np") as f:
      assert json.loads(f.metadata()["text_encoder"]) == config.text_encoder.to_dict()


@pytest.mark.parametrize("change, message", [
    (dict(model_name="classifier", model=dict(num_classes=10, backbone="resnet18")),
     "backbone 'resnet18' is not a ViT"),
    (dict(model=dict(image=dict(width=64, depth=2, mlp_dim=100, num_heads=2, patch_size=8,
                                pool="cls"), text={}, embed_dim=32)),
     "mlp_dim 100 is not a whole multiple of width 64"),
    (dict(model_name="lcl"), "method 'lcl' has no exportable image tower"),
])
def test_unsupported_options_are_refused_in_one_line(change, message, data_dir, tmp_path):
  config = helpers.tiny_clip_config(data_dir)
  for key, value in change.items():
    config[key] = value
  with pytest.raises(ValueError, match=message) as raised:
    export.export(config, str(tmp_path / "no_run"), str(tmp_path / "hf"))
  assert "\n" not in str(raised.value)
  assert not os.path.exists(tmp_path / "hf")  # refused before anything is read or written


@pytest.mark.integration
def test_command_line_exports_on_one_device(trained, data_dir, tmp_path):
  """`python -m vlpre.export` in a 1-device process restores a checkpoint that 8 devices
  saved (a pod's run exported on a laptop) and writes the in-process export's weights."""
  _, workdir, out = trained("clip")
  config_py = tmp_path / "config.py"
  config_py.write_text("from tests import helpers\n\n\ndef get_config(arg=None):\n"
                       f"  return helpers.tiny_clip_config({data_dir!r})\n")
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  done = subprocess.run([sys.executable, "-m", "vlpre.export", f"--config={config_py}",
                         f"--workdir={workdir}", f"--out={tmp_path / 'cli'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  for name in ("model.safetensors", "head.safetensors"):
    ours, theirs = load_numpy(os.path.join(out, name)), load_numpy(str(tmp_path / "cli" / name))
    assert sorted(ours) == sorted(theirs)
    for key in ours:
      np.testing.assert_array_equal(ours[key], theirs[key])
