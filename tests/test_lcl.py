"""LCL's model on real packed rows: outputs and where the visual tokens land, the <soi>
exclusion, zero-shot text and captioning through the causal model, a 2-step run on 8
devices through the real interleaved pipeline, and the SmolLM2 switch."""
import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from vlpre import data, methods, train, train_state
from vlpre.data import interleaved
from vlpre.evaluators import captioning, common
from vlpre.llm import generate as generate_lib
from vlpre.methods.lcl import losses as lcl_losses

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, L, M = 16, 64, 3  # 32 px / patch 8 → 16 visual tokens; rows of 64 tokens, 3 image slots


def lcl_config(data_dir, files, arg="tiny"):
  """configs/lcl.py at test size: 32 px, a 2-block ViT, a 2-layer decoder, 8 rows."""
  shard, docs, cifar = files
  path = os.path.join(ROOT, "configs", "lcl.py")
  spec = importlib.util.spec_from_file_location("lcl_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.input.update(data_dir=data_dir, documents=docs, images=shard, paired=shard, image_size=32,
                 resize_size=32, context_len=L, max_images=M, visual_tokens=P)
  c.model.image = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, pool="map")
  c.lcl.update(decoder=dict(width=32, depth=2, num_heads=2, mlp_dim=64), embed_dim=16)
  c.lcl.llm.num_layers = 2
  c.batch_size, c.total_steps, c.log_every = 8, 2, 1
  c.mesh = (("data", 2), ("fsdp", 4), ("tensor", 1))
  c.min_fsdp_size = 2**16
  c.optim.warmup_steps = 0
  small = dict(image_size=32, resize_size=32, batch_size=8, data_dir=data_dir, max_examples=8)
  c.evals = {
      "retrieval": dict(kind="retrieval", data=shard, max_text_len=16, **small),
      "zeroshot": dict(kind="zeroshot", data=cifar, classnames="cifar10", max_text_len=16, **small),
      "linear_probe": dict(kind="linear_probe", train_data=cifar, test_data=cifar, num_classes=10,
                           max_train_examples=16, **small),
      "attentive_probe": dict(kind="attentive_probe", train_data=cifar, test_data=cifar,
                              num_classes=10, max_train_examples=16, steps=3, num_heads=2, **small),
      "captioning": dict(kind="captioning", data=shard, max_new_tokens=3, **small)}
  return c


@pytest.fixture(scope="module")
def files(data_dir, tmp_path_factory):
  shard = helpers.small_shard(data_dir, tmp_path_factory.mktemp("flickr"), num_samples=16)
  docs = str(tmp_path_factory.mktemp("docs") / "train.jsonl")
  interleaved.build_flickr_interleaved(data_dir, docs, pattern=shard)
  cifar = helpers.small_shard(data_dir, tmp_path_factory.mktemp("cifar"),
                              pattern="cifar10/train-00000.tar", num_samples=16)
  return shard, docs, cifar


def _batch(config):
  batch = next(iter(data.build_train_dataset(
      config.input, global_batch_size=config.batch_size, seed=0,
      tokenizer=methods.build_tokenizer(config), records=methods.input_extras(config).records)))
  return {k: np.asarray(v) for k, v in batch.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def scratch(data_dir, files):
  """(config, setup, host variables, a real batch) of the from-scratch causal model."""
  config = lcl_config(data_dir, files)
  batch = _batch(config)
  s = train_state.setup(config, batch)
  return config, s, jax.device_get(s.variables(s.state)), batch


def _row(tokens, images, soi_at, length=L):
  """A one-row batch: `tokens` from position 0 (one segment), images[i]'s `<soi>` at soi_at[i]."""
  pad = length - len(tokens)
  visual = np.full((1, M, P), length, np.int32)
  soi = np.zeros((1, M), np.int32)
  present = np.zeros((1, M), bool)
  image_slots = np.zeros((1, M, *images[0].shape), np.float32)
  for i, (image, at) in enumerate(zip(images, soi_at)):
    visual[0, i], soi[0, i], present[0, i] = at + 1 + np.arange(P), at, True
    image_slots[0, i] = image
  return {"tokens": np.array([list(tokens) + [0] * pad], np.int32),
          "segment_ids": np.array([[1] * len(tokens) + [0] * pad], np.int32),
          "positions": np.array([list(range(len(tokens))) + [0] * pad], np.int32),
          "target_mask": np.zeros((1, length), np.int32), "images": image_slots,
          "image_present": present, "image_valid": present & (soi > 0), "soi_positions": soi,
          "visual_positions": visual}


@pytest.mark.slow
def test_outputs_and_visual_tokens_land_at_their_positions(scratch):
  config, s, variables, batch = scratch
  model = s.model
  out = model.apply(variables, batch)
  b, e = config.batch_size, config.lcl.embed_dim
  assert out["soi_embedding_BxMxE"].shape == out["image_latent_BxMxE"].shape == (b, M, e)
  assert out["logits_BxLxV"].shape == (b, L, 49408 + 3)  # CLIP BPE + placeholder, soi, eoi
  np.testing.assert_array_equal(out["image_valid_BxM"], batch["image_valid"])
  np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
  # The one scatter: every present slot's P tokens at its visual_positions, nothing else.
  present = batch["image_present"]
  visual = np.random.default_rng(0).normal(size=(b, M, P, 32)).astype(np.float32)
  _, emb, mask = model.apply(variables, batch["tokens"], visual, batch["visual_positions"],
                             method="decoder_inputs")
  want_mask = np.zeros((b, L), bool)
  for r, m in zip(*np.nonzero(present)):
    want_mask[r, batch["visual_positions"][r, m]] = True
    np.testing.assert_array_equal(emb[r, batch["visual_positions"][r, m]], visual[r, m])
  np.testing.assert_array_equal(mask, want_mask)
  assert want_mask.sum() == present.sum() * P
  assert np.all(batch["tokens"][want_mask] == 49408)  # they overwrite the placeholders
  # Poking one image changes only what follows its <soi> in its own piece (causality).
  r, m = [int(x) for x in np.argwhere(present)[-1]]
  images = batch["images"].copy()
  images[r, m] += 1.0
  poked = model.apply(variables, dict(batch, images=images))
  changed = np.abs(poked["logits_BxLxV"] - out["logits_BxLxV"]).max(-1) > 1e-5
  first = batch["visual_positions"][r, m, 0]
  segment = batch["segment_ids"][r, batch["soi_positions"][r, m]]
  expected = np.zeros((b, L), bool)
  expected[r, first:] = batch["segment_ids"][r, first:] == segment
  np.testing.assert_array_equal(changed, expected)
  np.testing.assert_allclose(poked["soi_embedding_BxMxE"], out["soi_embedding_BxMxE"], atol=1e-6)
  assert not np.allclose(poked["image_latent_BxMxE"][r, m], out["image_latent_BxMxE"][r, m])


@pytest.mark.slow
def test_soi_at_a_piece_start_is_excluded_from_the_contrastive_loss(data_dir, files, scratch):
  _, s, variables, _ = scratch
  config = lcl_config(data_dir, files, "tiny,paired")
  batch = _batch(config)  # paired only: image-first documents put <soi> at a piece start
  out = s.model.apply(variables, batch)
  rows, slots = np.nonzero(batch["image_present"])
  first_token = batch["positions"][rows, batch["soi_positions"][rows, slots]] == 0
  np.testing.assert_array_equal(out["image_valid_BxM"][rows, slots], ~first_token)
  assert first_token.any() and (~first_token).any()
  loss, metrics = lcl_losses.lcl_contrastive(out, batch)
  noise = np.random.default_rng(0).normal(size=out["soi_embedding_BxMxE"].shape)
  invalid = ~out["image_valid_BxM"][..., None]
  noisy = dict(out, soi_embedding_BxMxE=np.where(invalid, noise, out["soi_embedding_BxMxE"]))
  np.testing.assert_allclose(lcl_losses.lcl_contrastive(noisy, batch)[0], loss, rtol=1e-6)
  assert metrics["num_valid_images"] == (~first_token).sum()


@pytest.mark.slow
def test_zero_shot_text_is_the_soi_output_after_the_caption(scratch):
  config, s, variables, batch = scratch
  tok = methods.build_tokenizer(config)
  captions = ["a dog runs on the grass .", "two children"]
  ids, mask = tok.encode_batch(captions, 16)
  z = np.asarray(s.model.apply(variables, ids, mask, method="embed_text"))
  assert z.shape == (2, config.lcl.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
  # = the training forward's <soi> output of a text-first document [caption, <soi>, image].
  image = batch["images"][0, 0]
  for row, caption in enumerate(captions):
    text = tok.encode(caption)
    tokens = text + [49409] + [49408] * P + [49410]
    out = s.model.apply(variables, _row(tokens, [image], [len(text)]))
    soi = out["soi_embedding_BxMxE"][0, 0]
    np.testing.assert_allclose(z[row], soi / np.linalg.norm(soi), atol=1e-5)


def _greedy_matches_forward(s, variables, images, vocab, steps=4):
  """Greedy decoding from caption_inputs = argmax of the full forward on its own output."""
  cond = s.model.apply(variables, images, method="caption_inputs")
  assert cond["prompt_ids"].shape == (len(images), P + 2)
  assert cond["embeddings"].shape[:2] == cond["embeddings_mask"].shape == (len(images), P + 2)
  tokens = [rows[0] for rows in generate_lib.generate(
      s.built.llm, np.asarray(cond["prompt_ids"]).tolist(), max_new_tokens=steps, stop_ids=[],
      params=variables["params"]["llm"], embeddings=cond["embeddings"],
      embeddings_mask=cond["embeddings_mask"])]
  placeholder, soi, eoi = s.model.image_token_ids
  for image, generated in zip(images, tokens):
    row = _row([soi] + [placeholder] * P + [eoi] + generated, [image], [0])
    out = s.model.apply(variables, row)
    predicted = np.argmax(out["logits_BxLxV"][0, P + 1:P + 1 + steps, :vocab], -1)
    np.testing.assert_array_equal(predicted, generated)


@pytest.mark.slow
def test_captioning_decodes_what_the_forward_predicts(scratch):
  config, s, variables, batch = scratch
  images = batch["images"][:2, 0]
  _greedy_matches_forward(s, variables, images, vocab=49408 + 3)
  evaluator = captioning.Evaluator("captioning", config.evals["captioning"],
                                   common.Predictor(s, None))
  texts = evaluator.captions(variables, images)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.integration
def test_two_steps_on_8_devices_with_every_evaluator(data_dir, files, tmp_path):
  config = lcl_config(data_dir, files)
  last = train.run(config, str(tmp_path / "run"))
  assert math.isfinite(last["loss"])
  for name in ("lcl_contrastive", "lcl_generation"):
    assert math.isfinite(last[f"{name}/loss"]) and last[f"{name}/loss"] > 0
  assert last["lcl_contrastive/num_valid_images"] > 0 and last["lcl_generation/num_tokens"] > 0
  for key in ("retrieval/i2t_R@1", "zeroshot/top1", "linear_probe/top1", "attentive_probe/top1",
              "captioning/bleu4"):
    assert math.isfinite(last[key]), key


@pytest.mark.slow
def test_smollm2_switch_builds_and_runs(data_dir, files):
  config = lcl_config(data_dir, files, "tiny,llm=smollm2-135m")
  batch = _batch(config)
  s = train_state.setup(config, batch)
  variables = jax.device_get(s.variables(s.state))
  vocab = s.built.llm.config.vocab_size  # 49152: the pretrained table stays as loaded
  assert s.model.image_token_ids == (vocab, vocab + 1, vocab + 2)
  np.testing.assert_array_equal(variables["params"]["llm"]["embed_tokens"]["embedding"],
                                s.built.llm.params["embed_tokens"]["embedding"])
  assert variables["params"]["special_embed"].shape == (3, 576)
  out = s.model.apply(variables, batch)
  assert out["logits_BxLxV"].shape == (config.batch_size, L, vocab + 3)
  loss, _ = s.loss_fn(out, batch)
  assert np.isfinite(loss)
  ids, mask = s.built.llm.tokenizer.encode_batch(["a dog runs"], 16)
  assert s.model.apply(variables, ids, mask, method="embed_text").shape == (1, 16)
  _greedy_matches_forward(s, variables, batch["images"][:2, 0], vocab=vocab, steps=2)
