"""Public weights in (vlpre.weights): randomly initialised tiny source models (transformers,
open_clip), converted, give the source library's image and text features to 1e-4; a
big_vision .npz written from a converted tree carries big_vision's names and reads back."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, SiglipConfig,
                          SiglipModel)

from vlpre import weights
from vlpre.weights import big_vision

from tests import weights_helpers as wh

TOL = 1e-4
B, IMAGE, PATCH, LEN, VOCAB = 3, 16, 8, 12, 64


def _features(output) -> np.ndarray:
  """transformers 5's get_*_features return a tensor or an output with pooler_output."""
  tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
  return tensor.detach().numpy()


def _pixels(seed=0):
  return torch.randn(B, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def _eos_tokens(seed=0, eos=VOCAB - 1):
  """Rows of random ids, the EOS (the largest id, as CLIP's) after them, then padding 0."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((B, LEN), np.int64)
  for row, n in enumerate((3, 7, LEN - 1)):
    ids[row, :n] = rng.integers(1, eos, n)
    ids[row, n] = eos
  return ids


def _vlpre(config, towers, image_BxCxHxW, text_BxL):
  model, params = wh.vlpre_params(config, towers)
  image = jnp.asarray(wh.nhwc(image_BxCxHxW))
  text = jnp.asarray(text_BxL, jnp.int32)
  wh.check_shapes(model, params, {"image": image, "text": text})
  initialised = model.init(jax.random.key(0), {"image": image, "text": text})["params"]
  variables = {"params": {**nn.meta.unbox(initialised), **params}}  # parts not loaded: as init
  out = model.apply(variables, image, method="embed_image")
  ztxt = model.apply(variables, text, method="embed_text") if "txt" in params else None
  return out, ztxt


CLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=LEN, hidden_act="quick_gelu",
                 eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=0)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu")
# What a user sets for the tiny CLIP above: OpenAI CLIP's architecture at these sizes.
CLIP_MODEL = dict(
    image=dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=PATCH, pool="cls",
               pre_norm=True, act="quick_gelu", norm_eps=1e-5),
    text=dict(vocab_size=VOCAB, max_len=LEN, width=32, depth=2, mlp_dim=48, num_heads=2,
              act="quick_gelu", norm_eps=1e-5),
    embed_dim=24)


def _saved(model, folder):
  """A perturbed random transformers model and the folder it is saved in."""
  model.eval()
  wh.perturb(model)
  model.save_pretrained(folder)
  return model, str(folder)


def _assert_features_match(model, out, ztxt, pixels, ids):
  """vlpre's image and text embeddings against the transformers model's."""
  with torch.no_grad():
    want_img = _features(model.get_image_features(pixel_values=pixels))
    want_txt = _features(model.get_text_features(input_ids=torch.as_tensor(ids)))
  np.testing.assert_allclose(out["zimg"], want_img, atol=TOL)
  np.testing.assert_allclose(ztxt, want_txt, atol=TOL)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  torch.manual_seed(0)
  return _saved(CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION,
                                     projection_dim=24)), tmp_path_factory.mktemp("hf_clip"))


@pytest.mark.slow  # eager forwards of both libraries: 5-18 s on 2 cores
def test_hf_clip_features_match_transformers(hf_clip):
  model, path = hf_clip
  pixels, ids = _pixels(), _eos_tokens()
  out, ztxt = _vlpre(wh.two_tower_config(CLIP_MODEL), weights.read(path), pixels, ids)
  _assert_features_match(model, out, ztxt, pixels, ids)


def test_a_config_that_does_not_fit_is_refused_in_one_line(hf_clip):
  _, path = hf_clip
  model = {**CLIP_MODEL, "image": {**CLIP_MODEL["image"], "pre_norm": False, "act": "gelu_tanh"}}
  with pytest.raises(ValueError) as e:
    wh.vlpre_params(wh.two_tower_config(model), weights.read(path))
  message = str(e.value)
  assert "\n" not in message
  assert "image.pre_norm=True (config: False)" in message
  assert "image.act='quick_gelu' (config: 'gelu_tanh')" in message


def test_lit_takes_only_the_image_tower(hf_clip):
  _, path = hf_clip
  model = {**CLIP_MODEL, "text": dict(vocab_size=100, max_len=8, width=16, depth=1, mlp_dim=32,
                                      num_heads=2)}  # LiT's own text tower: any shape
  _, params = wh.vlpre_params(wh.two_tower_config(model, prefixes=("img", "img_head")),
                              weights.read(path))
  assert sorted(params) == ["img", "img_head"]


SIGLIP_MODEL = dict(
    image=dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=PATCH, pool="map"),
    text=dict(vocab_size=VOCAB, max_len=LEN, width=32, depth=2, mlp_dim=48, num_heads=2,
              causal=False, pool="final"),
    embed_dim=32, image_head=False, text_head_bias=True, logit_bias_init=-10.0)


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
  torch.manual_seed(0)
  text = {k: v for k, v in CLIP_TEXT.items() if k != "hidden_act"}
  vision = {k: v for k, v in CLIP_VISION.items() if k != "hidden_act"}
  return _saved(SiglipModel(SiglipConfig(text_config=text, vision_config=vision)),
                tmp_path_factory.mktemp("hf_siglip"))


@pytest.mark.slow  # eager forwards of both libraries: 5-18 s on 2 cores
def test_hf_siglip_features_match_transformers(hf_siglip):
  model, path = hf_siglip
  pixels = _pixels()
  ids = np.random.default_rng(1).integers(0, VOCAB, (B, LEN))
  towers = weights.read(path)
  out, ztxt = _vlpre(wh.two_tower_config(SIGLIP_MODEL), towers, pixels, ids)
  _assert_features_match(model, out, ztxt, pixels, ids)
  assert towers.logit_bias == pytest.approx(model.logit_bias.item())


@pytest.mark.slow  # eager forwards of both libraries: 5-18 s on 2 cores
def test_hf_dinov2_tower_matches_transformers(tmp_path):
  torch.manual_seed(0)
  model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   mlp_ratio=2, image_size=IMAGE, patch_size=PATCH)).eval()
  wh.perturb(model)  # LayerScale's λ too: folded into the attention output and fc2
  model.save_pretrained(tmp_path)
  config = wh.two_tower_config(
      {**CLIP_MODEL, "image": dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=PATCH,
                                   pool="cls", act="gelu")}, prefixes=("img",))
  pixels = _pixels()
  out, _ = _vlpre(config, weights.read(str(tmp_path)), pixels, _eos_tokens())
  with torch.no_grad():
    want = model(pixel_values=pixels).pooler_output.numpy()
  np.testing.assert_allclose(out["pre_logits"], want, atol=TOL)


OPEN_CLIP = dict(embed_dim=16, quick_gelu=False,
                 vision_cfg=dict(image_size=IMAGE, layers=2, width=32, patch_size=PATCH,
                                 head_width=16, mlp_ratio=2.0),
                 text_cfg=dict(context_length=LEN, vocab_size=VOCAB, width=32, heads=2, layers=2,
                               mlp_ratio=1.5))


@pytest.mark.slow  # eager forwards of both libraries: 5-18 s on 2 cores
def test_open_clip_state_dict_features_match_open_clip(tmp_path):
  open_clip = wh.import_open_clip()
  torch.manual_seed(0)
  model = open_clip.CLIP(**OPEN_CLIP).eval()
  wh.perturb(model)
  torch.save(model.state_dict(), tmp_path / "model.pt")
  (tmp_path / "tiny.json").write_text(json.dumps(OPEN_CLIP))
  towers = weights.read(str(tmp_path / "model.pt"), str(tmp_path / "tiny.json"))
  vlpre_model = dict(
      image=dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=PATCH, pool="cls",
                 pre_norm=True, act="gelu", norm_eps=1e-5),
      text=dict(vocab_size=VOCAB, max_len=LEN, width=32, depth=2, mlp_dim=48, num_heads=2,
                act="gelu", norm_eps=1e-5),
      embed_dim=16)
  pixels, ids = _pixels(), _eos_tokens()
  out, ztxt = _vlpre(wh.two_tower_config(vlpre_model), towers, pixels, ids)
  with torch.no_grad():
    want_img = model.encode_image(pixels).numpy()
    want_txt = model.encode_text(torch.as_tensor(ids)).numpy()
  np.testing.assert_allclose(out["zimg"], want_img, atol=TOL)
  np.testing.assert_allclose(ztxt, want_txt, atol=TOL)


def test_open_clip_state_dict_needs_its_model_config(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="open_clip_model"):
    weights.read(str(tmp_path / "model.safetensors"))


# big_vision's names (models/vit.py, models/proj/image_text/{two_towers,text_transformer}.py):
# Encoder1DBlock's submodules, the ViT's and the text transformer's own parameters.
BV_BLOCK = ["LayerNorm_0/scale", "LayerNorm_0/bias", "LayerNorm_1/scale", "LayerNorm_1/bias",
            *[f"MultiHeadDotProductAttention_0/{n}/{p}" for n in ("query", "key", "value", "out")
              for p in ("kernel", "bias")],
            *[f"MlpBlock_0/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")]]
BV_MAP_HEAD = ["probe", "LayerNorm_0/scale", "LayerNorm_0/bias",
               *[n for n in BV_BLOCK if n.startswith(("MultiHead", "MlpBlock"))]]


@pytest.mark.slow  # eager forwards of both libraries: 5-18 s on 2 cores
def test_big_vision_npz_has_big_visions_names_and_reads_back(hf_siglip, tmp_path):
  model, path = hf_siglip
  towers = weights.read(path)
  keys = big_vision.write(towers, str(tmp_path / "siglip.npz"))
  want = {"t", "b", "img/embedding/kernel", "img/embedding/bias", "img/pos_embedding",
          "img/Transformer/encoder_norm/scale", "img/Transformer/encoder_norm/bias",
          "txt/Embed_0/embedding", "txt/pos_embedding", "txt/Encoder_0/encoder_norm/scale",
          "txt/Encoder_0/encoder_norm/bias", "txt/head/kernel", "txt/head/bias",
          *[f"img/MAPHead_0/{n}" for n in BV_MAP_HEAD],
          *[f"img/Transformer/encoderblock_{i}/{n}" for i in (0, 1) for n in BV_BLOCK],
          *[f"txt/Encoder_0/encoderblock_{i}/{n}" for i in (0, 1) for n in BV_BLOCK]}
  assert set(keys) == want
  back = weights.read(str(tmp_path / "siglip.npz"))
  assert back.image_options == towers.image_options
  assert back.text_options == towers.text_options
  pixels = _pixels()
  ids = np.random.default_rng(1).integers(0, VOCAB, (B, LEN))
  out, ztxt = _vlpre(wh.two_tower_config(SIGLIP_MODEL), back, pixels, ids)
  _assert_features_match(model, out, ztxt, pixels, ids)


def test_big_vision_vit_npz_scanned_or_not(hf_clip, tmp_path):
  """A plain ViT .npz (cls pooling), unrolled and stacked (scan=True), reads back equal."""
  towers = weights.read(hf_clip[1])
  towers.image.pop("ln_pre")  # big_vision's ViT has no LayerNorm before the blocks
  towers.image_options["pre_norm"] = False
  vit_only = weights.Towers("t", towers.image, towers.image_options)
  keys = big_vision.write(vit_only, str(tmp_path / "vit.npz"))
  assert "cls" in keys and "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel" in keys
  with np.load(tmp_path / "vit.npz") as npz:  # the same weights, blocks stacked as scan=True
    flat = dict(npz)
  stacked = {k: v for k, v in flat.items() if "encoderblock_" not in k}
  for name in BV_BLOCK:
    stacked[f"Transformer/encoderblock/{name}"] = np.stack(
        [flat[f"Transformer/encoderblock_{i}/{name}"] for i in (0, 1)])
  np.savez(tmp_path / "scanned.npz", **{f"params/{k}": v for k, v in stacked.items()})
  for file in ("vit.npz", "scanned.npz"):
    back = weights.read(str(tmp_path / file))
    assert back.image_options == {**towers.image_options, "act": "gelu_tanh", "norm_eps": 1e-6}
    np.testing.assert_array_equal(back.image["encoder"]["blocks"][1]["attn"]["out"]["kernel"],
                                  towers.image["encoder"]["blocks"][1]["attn"]["out"]["kernel"])
    np.testing.assert_array_equal(back.image["cls"], towers.image["cls"])
