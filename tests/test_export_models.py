"""vlpre.export --format=hf / open_clip: a two-tower run as a whole CLIPModel, SiglipModel
or open_clip model, whose zero-shot logits equal vlpre's to 1e-4; the transformers
zero-shot pipeline runs on the exported CLIPModel folder.

The runs are tiny two-tower models with random (perturbed) weights saved as a run's
checkpoint, so that the export reads them as it reads a trained run's."""
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
import torch
import transformers

from vlpre import checkpoint, config_lib, export, methods
from vlpre.data import tokenizers

from tests import weights_helpers as wh

TOL = 1e-4
IMAGE, LEN = 16, 16
TEXTS = ["a photo of a dog", "a red car on a street", "two cats"]

CLIP_MODEL = dict(
    image=dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8, pool="cls",
               pre_norm=True, act="quick_gelu", norm_eps=1e-5, scan=True),
    text=dict(max_len=LEN, width=32, depth=2, mlp_dim=48, num_heads=2, act="quick_gelu",
              norm_eps=1e-5, scan=False),
    embed_dim=24)
SIGLIP_MODEL = dict(
    image=dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8, pool="map", scan=False),
    text=dict(max_len=LEN, width=32, depth=2, mlp_dim=48, num_heads=2, causal=False, pool="final"),
    embed_dim=32, image_head=False, text_head_bias=True, logit_scale_init=float(np.log(10.0)),
    logit_bias_init=-10.0)


def _config(model: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      model_name="two_tower", model=model, tokenizer=dict(name="clip_bpe"),
      input=dict(image_size=IMAGE, resize_size=IMAGE)))


def _run(tmp_path, model: dict):
  """A workdir whose checkpoint holds a tiny two-tower model's perturbed random weights."""
  config = _config(model)
  net = methods.build_model("two_tower", config.model.to_dict())
  tokens, mask = tokenizers.ClipBpeTokenizer().encode_batch(TEXTS, LEN)
  images = jax.random.normal(jax.random.key(1), (2, IMAGE, IMAGE, 3))
  params = nn.meta.unbox(net.init(jax.random.key(0), {"image": images, "text": tokens}))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  saver = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
  saver.save(1, {"params": params}, None, force=True)
  saver.close()
  out = net.apply({"params": params}, {"image": images, "text": tokens, "text_mask": mask})
  zimg = out["zimg"] / jnp.linalg.norm(out["zimg"], axis=-1, keepdims=True)
  ztxt = out["ztxt"] / jnp.linalg.norm(out["ztxt"], axis=-1, keepdims=True)
  logits = zimg @ ztxt.T * out["logit_scale"] + out["logit_bias"]
  pixels = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
  return config, str(tmp_path / "run"), np.asarray(logits), pixels, torch.as_tensor(tokens).long()


def _assert_export_logits(config, workdir, out, kind, want, pixels, tokens):
  """Exports with --format=hf as `kind`; its zero-shot logits equal vlpre's."""
  assert export.export_model(config, workdir, str(out), "hf") == kind
  model = getattr(transformers, kind).from_pretrained(out).eval()
  with torch.no_grad():
    got = model(pixel_values=pixels, input_ids=tokens).logits_per_image.numpy()
  np.testing.assert_allclose(got, want, atol=TOL)


@pytest.mark.slow  # a tiny model's eager forward in both libraries: ~10 s on 2 cores
def test_clip_run_exports_as_a_clip_model_with_vlpres_logits(tmp_path):
  config, workdir, want, pixels, tokens = _run(tmp_path, CLIP_MODEL)
  _assert_export_logits(config, workdir, tmp_path / "hf", "CLIPModel", want, pixels, tokens)
  hf_tokens = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(
      TEXTS, padding="max_length", max_length=LEN)["input_ids"]
  np.testing.assert_array_equal(hf_tokens, tokens.numpy())  # the same ids as vlpre's tokenizer
  classify = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path / "hf"))
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8))
  result = classify(image, candidate_labels=["dog", "car", "cat"])
  assert sorted(r["label"] for r in result) == ["car", "cat", "dog"]
  assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_siglip_run_exports_as_a_siglip_model_with_vlpres_logits(tmp_path):
  config, workdir, want, pixels, tokens = _run(tmp_path, SIGLIP_MODEL)
  _assert_export_logits(config, workdir, tmp_path / "hf", "SiglipModel", want, pixels, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("name,kind", [("clip", "CLIPModel"), ("siglip", "SiglipModel")])
def test_the_hf_option_of_the_shipped_configs_exports_whole(tmp_path, name, kind):
  """`configs/<name>.py:tiny,hf` (its towers at their width, 2 blocks deep) exports as a
  transformers `kind` whose logits are vlpre's (the default towers are refused:
  test_a_run_no_public_class_expresses_is_refused_in_one_line)."""
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.py")
  model = config_lib.load(path + ":tiny,hf").model.to_dict()
  model["image"]["depth"] = model["text"]["depth"] = 2
  config, workdir, want, pixels, tokens = _run(tmp_path, model)
  _assert_export_logits(config, workdir, tmp_path / "hf", kind, want, pixels, tokens)


@pytest.mark.slow
def test_clip_run_exports_in_open_clip_format_with_vlpres_logits(tmp_path):
  model = {**CLIP_MODEL, "image": {**CLIP_MODEL["image"], "act": "gelu"},
           "text": {**CLIP_MODEL["text"], "act": "gelu"}}
  config, workdir, want, pixels, tokens = _run(tmp_path, model)
  export.export_model(config, workdir, str(tmp_path / "oc"), "open_clip")
  open_clip = wh.import_open_clip()
  net = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
  with torch.no_grad():
    zimg = net.encode_image(pixels, normalize=True)
    ztxt = net.encode_text(tokens, normalize=True)
    got = (net.logit_scale.exp() * zimg @ ztxt.T).numpy()
  np.testing.assert_allclose(got, want, atol=TOL)


def test_a_run_no_public_class_expresses_is_refused_in_one_line(tmp_path):
  """configs/clip.py's towers (no LayerNorm before the blocks) are no CLIPModel."""
  model = {**CLIP_MODEL, "image": {**CLIP_MODEL["image"], "pre_norm": False}}
  config = _config(model)
  net = methods.build_model("two_tower", config.model.to_dict())
  params = nn.meta.unbox(jax.eval_shape(lambda: net.init(
      jax.random.key(0), {"image": jnp.zeros((1, IMAGE, IMAGE, 3)),
                          "text": jnp.ones((1, LEN), jnp.int32)})))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
  saver = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  saver.save(1, {"params": params}, None, force=True)
  saver.close()
  with pytest.raises(ValueError) as e:
    export.export_model(config, str(tmp_path), str(tmp_path / "out"), "hf")
  assert "\n" not in str(e.value) and "image pre_norm False (CLIP: True)" in str(e.value)
  with pytest.raises(ValueError, match="no open_clip CLIP: the image tower needs"):
    export.export_model(config, str(tmp_path), str(tmp_path / "out"), "open_clip")


def test_push_to_hub_needs_a_local_folder_and_a_known_format():
  """Argument handling only: the upload itself needs a network, which tests never use."""
  from absl import app  # pylint: disable=g-import-not-at-top
  flag = lambda value: types.SimpleNamespace(value=value)  # noqa: E731
  with pytest.raises(app.UsageError, match="--push_to_hub uploads a local --out folder"):
    export.main([], flag(None), flag("w"), flag("gs://bucket/out"), flag("hf"), flag("me/model"))
  with pytest.raises(app.UsageError, match="--format=onnx"):
    export.main([], flag(None), flag("w"), flag("out"), flag("onnx"), flag(""))
