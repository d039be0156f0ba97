"""Attentive probe: reads a signal that mean pooling drowns; runs end to end on CIFAR-10."""
import jax
import numpy as np
import pytest

from vlpre import sharding
from vlpre import train_state
from vlpre.evaluators import attentive_probe, common, linear_probe
from vlpre.methods.gpt4image import model as classifier
from vlpre.methods.lift import model as lift
from vlpre.methods.two_tower import model as two_tower

from tests import helpers

TINY_VIT = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)


def marked_token_data(rng, num, num_tokens=16, width=16, num_classes=4):
  """Every token is a random class's prototype plus noise; one token, at a random position,
  also carries a marker, and its prototype is the label. The mean of the tokens holds the
  label only as one vote among N (the other N-1 are random classes)."""
  prototypes_CxD = 3.0 * np.eye(width)[:num_classes]
  marker_D = 3.0 * np.eye(width)[num_classes]
  labels_X = rng.integers(num_classes, size=num)
  classes_XxN = rng.integers(num_classes, size=(num, num_tokens))
  position_X = rng.integers(num_tokens, size=num)
  classes_XxN[np.arange(num), position_X] = labels_X
  x_XxNxD = prototypes_CxD[classes_XxN] + 0.3 * rng.normal(size=(num, num_tokens, width))
  x_XxNxD[np.arange(num), position_X] += marker_D
  return x_XxNxD.astype(np.float32), labels_X


def test_attention_finds_the_marked_token_where_the_mean_fails():
  rng = np.random.default_rng(0)
  x_train, y_train = marked_token_data(rng, 1024)
  x_test, y_test = marked_token_data(rng, 512)
  predict, losses = attentive_probe.train_probe(
      x_train, y_train, 4, steps=100, lr=1e-2, weight_decay=1e-4, batch_size=128, num_heads=2)
  attentive_top1 = np.mean(predict(x_test) == y_test)
  w = linear_probe.fit_ridge(x_train.mean(1), y_train, 4, l2=1e-3)
  mean_top1 = np.mean(linear_probe.predict(w, x_test.mean(1)) == y_test)
  assert attentive_top1 >= 0.95 and losses[-1] < 0.2 * losses[0]
  assert mean_top1 < 0.6 and attentive_top1 - mean_top1 > 0.35, (attentive_top1, mean_top1)


def test_training_is_deterministic_given_the_seed():
  x, y = marked_token_data(np.random.default_rng(1), 64, num_tokens=4, width=8, num_classes=2)
  kwargs = dict(steps=5, lr=1e-2, weight_decay=1e-4, batch_size=16, num_heads=2)
  _, a = attentive_probe.train_probe(x, y, 2, seed=3, **kwargs)
  _, b = attentive_probe.train_probe(x, y, 2, seed=3, **kwargs)
  _, c = attentive_probe.train_probe(x, y, 2, seed=4, **kwargs)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def _init_apply(model, batch):
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  return lambda method: jax.tree.map(np.asarray, jax.jit(
      lambda v, image: model.apply(v, image, method=method))(variables, batch["image"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["two_tower", "lift", "classifier_vit", "classifier_resnet"])
def test_embed_patches_are_the_tokens_that_are_pooled(name):
  """[B, N, D] float32; where the model mean-pools, their mean is its pooled feature."""
  image = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  if name == "two_tower":
    model = two_tower.Model(image={**TINY_VIT, "pool": "mean"}, embed_dim=8,
                            text=dict(width=32, depth=1, mlp_dim=64, num_heads=2, max_len=8))
    apply = _init_apply(model, {"image": image, "text": np.zeros((2, 8), np.int32)})
  elif name == "lift":
    apply = _init_apply(lift.Model(image=TINY_VIT, text_dim=8),
                        {"image": image, "txt_emb": np.zeros((2, 8), np.float32)})
  elif name == "classifier_vit":
    apply = _init_apply(classifier.Model(num_classes=3, backbone="vit", vit=TINY_VIT), {"image": image})
  else:
    apply = _init_apply(classifier.Model(num_classes=3, backbone="resnet18", width=8,
                                         cifar_stem=True), {"image": image})
  tokens_BxNxD = apply("embed_patches")
  width = 64 if name == "classifier_resnet" else 32  # resnet18: 8 * 2^3 channels, 4x4 map
  assert tokens_BxNxD.shape == (2, 16, width) and tokens_BxNxD.dtype == np.float32
  if name != "classifier_vit":  # that one pools with a cls token
    np.testing.assert_allclose(tokens_BxNxD.mean(1), apply("embed_image")["pre_logits"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_evaluator_end_to_end_on_tiny_clip_is_deterministic(data_dir):
  config = helpers.tiny_clip_config(data_dir)
  example = {"image": np.zeros((16, 32, 32, 3), np.float32), "text": np.zeros((16, 16), np.int32),
             "text_mask": np.ones((16, 16), np.int32)}
  s = train_state.setup(config, example)
  cfg = dict(kind="attentive_probe", train_data="cifar10/train-*.tar",
             test_data="cifar10/test-*.tar", num_classes=10, max_train_examples=192,
             max_examples=64, image_size=32, resize_size=36, batch_size=32, data_dir=data_dir,
             steps=10, lr=1e-3, num_heads=2)
  predictor = common.Predictor(s, tokenizer=None)
  evaluator = attentive_probe.Evaluator("probe", cfg, predictor)
  with sharding.active(s.mesh, s.rules):
    tokens = predictor.image_outputs(
        s.variables(), common.eval_batches(cfg, cfg["test_data"], max_examples=64, with_labels=True),
        "embed_patches")
    first, second = evaluator.run(s.variables()), evaluator.run(s.variables())
  assert tokens["embed_patches"].shape == (64, 16, 64) and tokens["label"].shape == (64,)
  assert sorted(first) == ["probe/top1", "probe/train_loss"]
  assert 0.0 <= first["probe/top1"] <= 1.0 and np.isfinite(first["probe/train_loss"])
  assert first == second
