"""GPT4Image: losses vs naive references, synced BatchNorm, the classifier, the three stages."""
import functools
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlpre import llm as llm_lib
from vlpre import losses, metrics, sharding, train
from vlpre.methods.gpt4image import describe
from vlpre.methods.gpt4image import model as classifier
from vlpre.nn.resnet import ResNet, batch_norm
from vlpre.text_encoders import store as store_lib

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpt4image_config(arg="tiny_resnet"):
  spec = importlib.util.spec_from_file_location("gpt4image_config",
                                                os.path.join(ROOT, "configs", "gpt4image.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ------------------------------------------------------------------------------ losses


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def naive_ce(logits, labels=None, targets=None, smoothing=0.0):
  n, c = logits.shape
  total = 0.0
  for i in range(n):
    t = targets[i] if targets is not None else np.eye(c)[labels[i]]
    t = t * (1 - smoothing) + smoothing / c
    total -= np.sum(t * _log_softmax(logits[i]))
  return total / n


def naive_infonce(zproj, txt, temperature, symmetric=True):
  sim = _normalize(zproj) @ _normalize(txt).T / temperature
  n = len(sim)
  i2t = -np.mean([_log_softmax(sim[i])[i] for i in range(n)])
  if not symmetric:
    return i2t
  t2i = -np.mean([_log_softmax(sim[:, i])[i] for i in range(n)])
  return 0.5 * (i2t + t2i)


def naive_byol(zproj, txt):
  return np.mean([2 - 2 * np.dot(_normalize(a), _normalize(b)) for a, b in zip(zproj, txt)])


def _text_case(n=16, e=12, seed=0, temperature=0.2):
  rng = np.random.default_rng(seed)
  outputs = {"zproj": rng.normal(size=(n, e)).astype(np.float32),
             "text_temperature": np.float32(temperature)}
  batch = {"txt_emb": rng.normal(size=(n, e)).astype(np.float32)}
  return outputs, batch


TEXT_CASES = {
    "text_infonce": lambda o, b: naive_infonce(o["zproj"], b["txt_emb"], o["text_temperature"]),
    "text_infonce_oneway": lambda o, b: naive_infonce(o["zproj"], b["txt_emb"],
                                                      o["text_temperature"], symmetric=False),
    "text_byol": lambda o, b: naive_byol(o["zproj"], b["txt_emb"]),
}


def test_softmax_ce_matches_naive_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=8)
  value, m = losses.LOSSES["softmax_ce"]({"logits": logits}, {"label": labels})
  np.testing.assert_allclose(float(value), naive_ce(logits, labels), rtol=1e-5)
  assert float(m["accuracy"]) == np.mean(logits.argmax(1) == labels)
  smoothed, _ = losses.LOSSES["softmax_ce"](
      {"logits": logits, "label_smoothing": np.float32(0.1)}, {"label": labels})
  np.testing.assert_allclose(float(smoothed), naive_ce(logits, labels, smoothing=0.1), rtol=1e-5)
  soft = rng.dirichlet(np.ones(5), size=8).astype(np.float32)
  mixed, _ = losses.LOSSES["softmax_ce"]({"logits": logits, "targets": soft}, {"label": labels})
  np.testing.assert_allclose(float(mixed), naive_ce(logits, targets=soft), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TEXT_CASES))
def test_text_loss_matches_naive_reference(name):
  outputs, batch = _text_case()
  value, _ = losses.LOSSES[name](outputs, batch)
  np.testing.assert_allclose(float(value), TEXT_CASES[name](outputs, batch), rtol=1e-5)


@pytest.mark.parametrize("name", ["text_infonce", "text_infonce_oneway"])
def test_text_infonce_sharded_over_8_devices_sees_the_global_batch(name):
  """2 of 16 samples per device; the negatives must still be all 16 descriptions."""
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  outputs, batch = _text_case(n=16, temperature=0.05)
  row, rep = NamedSharding(mesh, P(sharding.BATCH_AXES)), NamedSharding(mesh, P())
  placed_out = {k: jax.device_put(v, row if np.ndim(v) else rep) for k, v in outputs.items()}
  placed_batch = {k: jax.device_put(v, row) for k, v in batch.items()}
  assert placed_out["zproj"].addressable_shards[0].data.shape[0] == 2
  value, _ = jax.jit(lambda o, b: losses.LOSSES[name](o, b))(placed_out, placed_batch)
  expected = TEXT_CASES[name](outputs, batch)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  local = np.mean([TEXT_CASES[name]({**outputs, "zproj": outputs["zproj"][i:i + 2]},
                                    {"txt_emb": batch["txt_emb"][i:i + 2]})
                   for i in range(0, 16, 2)])
  assert abs(local - expected) > 1e-2  # a per-device loss would not pass


def test_zero_weight_switches_a_term_off():
  """The CE-only baseline: text_loss_weight=0 needs neither zproj nor txt_emb."""
  logits = np.zeros((4, 3), np.float32)
  total, m = losses.build_loss({"softmax_ce": 1.0, "text_infonce": 0.0})(
      {"logits": logits}, {"label": np.zeros(4, np.int32)})
  np.testing.assert_allclose(float(total), math.log(3), rtol=1e-6)
  assert "text_infonce/loss" not in m
  with pytest.raises(ValueError, match="txt_emb"):
    losses.LOSSES["text_infonce"]({"zproj": logits, "text_temperature": 0.2}, {})


# -------------------------------------------------------------------- BatchNorm, models


def test_batchnorm_statistics_span_the_global_batch_on_8_devices():
  """Each device's rows come from a different distribution: local stats would differ."""
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  rng = np.random.default_rng(0)
  x_Bx3 = (rng.normal(size=(16, 3)) * np.repeat(np.arange(1, 9), 2)[:, None]
           + np.repeat(np.arange(8) * 3.0, 2)[:, None]).astype(np.float32)
  bn = batch_norm(train=True, dtype=jnp.float32)
  variables = bn.init(jax.random.key(0), x_Bx3)
  placed = jax.device_put(x_Bx3, NamedSharding(mesh, P(sharding.BATCH_AXES)))
  assert placed.addressable_shards[0].data.shape == (2, 3)
  y, state = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, placed)
  mean, var = x_Bx3.mean(0), x_Bx3.var(0)  # naive statistics of the WHOLE batch
  np.testing.assert_allclose(np.asarray(y), (x_Bx3 - mean) / np.sqrt(var + 1e-5), atol=1e-4)
  stats = state["batch_stats"]
  np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * var, rtol=1e-5)
  local_mean = x_Bx3[:2].mean(0)
  assert np.abs(local_mean - mean).max() > 1.0


def _model_inputs(size):
  batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(4, size, size, 3)),
                                jnp.float32), "label": jnp.arange(4)}
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1), "aug": jax.random.key(2)}
  return batch, rngs


@pytest.mark.parametrize("backbone,stem,size,width", [
    ("resnet18", True, 32, 64), ("resnet50", False, 64, 256),
    ("vit", False, 32, 32)])
def test_classifier_output_shapes(backbone, stem, size, width):
  """Shapes only (jax.eval_shape: traced, never compiled)."""
  model = classifier.Model(num_classes=10, backbone=backbone, width=8, cifar_stem=stem,
                           text_dim=12, vit=dict(width=32, depth=1, mlp_dim=64, num_heads=2,
                                                 patch_size=8))
  batch, rngs = _model_inputs(size)
  variables = jax.eval_shape(functools.partial(model.init, train=False), rngs, batch)
  assert ("batch_stats" in variables) == (backbone != "vit" or model.text_dim > 0)
  out, state = jax.eval_shape(functools.partial(model.apply, train=True, rngs=rngs,
                                                mutable=["batch_stats"]), variables, batch)
  assert out["logits"].shape == (4, 10) and out["feature"].shape == (4, width)
  assert out["zproj"].shape == (4, 12) and "targets" not in out  # no mixing configured
  assert jax.tree.map(lambda x: x.shape, state) == jax.tree.map(
      lambda x: x.shape, {"batch_stats": variables["batch_stats"]})
  logits = jax.eval_shape(functools.partial(model.apply, method=model.classify), variables,
                          batch["image"])
  embedded = jax.eval_shape(functools.partial(model.apply, method=model.embed_image), variables,
                            batch["image"])
  assert logits.shape == (4, 10) and embedded["pre_logits"].shape == (4, width)


def test_resnet_batch_stats_update_in_training_only():
  resnet = ResNet(stage_sizes=(1, 1), block="basic", width=4, cifar_stem=True)
  image = _model_inputs(8)[0]["image"]
  variables = nn.meta.unbox(jax.jit(functools.partial(resnet.init, train=False))(
      jax.random.key(0), image))

  @jax.jit
  def apply(variables, image):
    feature, train_state = resnet.apply(variables, image, train=True, mutable=["batch_stats"])
    _, eval_state = resnet.apply(variables, image, train=False, mutable=["batch_stats"])
    return feature, train_state, eval_state

  feature, state, eval_state = apply(variables, image)
  assert feature.shape == (4, 8)
  before = jax.tree.leaves(variables["batch_stats"])
  assert len(before) == 2 * (1 + 2 * 2 + 1)  # mean and var: stem, 2 per block, 1 shortcut
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state["batch_stats"]), before))
  for a, b in zip(jax.tree.leaves(eval_state["batch_stats"]), before):  # eval: running stats
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_match_the_mixed_pixels(mixup, cutmix):
  """Image i is constant i: its mean pixel must equal the class index its targets imply."""
  image_Bx8x8x3 = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None], (4, 8, 8, 3))
  targets_Bx4 = jnp.eye(4)
  mix = jax.jit(functools.partial(classifier.mix_batch, mixup_alpha=mixup, cutmix_alpha=cutmix))
  for seed in range(4):
    mixed, targets = mix(jax.random.key(seed), image_Bx8x8x3, targets_Bx4)
    targets = np.asarray(targets)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0, [1, 2]], 0.0)  # only the flipped partner mixes in
    np.testing.assert_allclose(np.asarray(mixed).mean(axis=(1, 2, 3)), targets @ np.arange(4.0),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- stage 1: describe


def _cifar_config(tmp_path, shard, backend="precomputed"):
  c = gpt4image_config("tiny_resnet")
  c.input.train = shard
  c.describe.backend = backend
  c.describe.output_dir = str(tmp_path / "descriptions")
  return c


def _shard_keys(shard):
  from vlpre import data  # pylint: disable=g-import-not-at-top
  source = data.TarShardSource(shard)
  return [source[i]["__key__"] for i in range(len(source))]


@pytest.fixture(scope="module")
def cifar_shard(data_dir, tmp_path_factory):
  return helpers.small_shard(data_dir, tmp_path_factory.mktemp("cifar"),
                             pattern="cifar10/train-00000.tar", num_samples=16)


def _write_jsonl(path, rows):
  with open(path, "wb") as f:
    for row in rows:
      f.write(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode())


def test_describe_precomputed_validates_and_resumes(cifar_shard, tmp_path):
  keys = _shard_keys(cifar_shard)
  assert len(keys) == 16 and keys[0].startswith("airplane_")
  source = str(tmp_path / "given.jsonl")
  config = _cifar_config(tmp_path, cifar_shard)
  config.describe.precomputed = source

  _write_jsonl(source, [{"key": k, "description": f"a photo of {k}"} for k in keys[1:]])
  with pytest.raises(ValueError, match="1 of 16 training images have no description"):
    describe.describe(config, progress=False)
  _write_jsonl(source, [{"key": k, "description": "" if k == keys[3] else "x"} for k in keys])
  with pytest.raises(ValueError, match="empty or missing 'description'"):
    describe.describe(config, progress=False)
  _write_jsonl(source, [{"key": k, "description": "x"} for k in keys[1:]] +
               [f'{{"key": "{keys[0]}", "description": "caf'.encode() + b'\xe9"}\n'])
  with pytest.raises(ValueError, match="not UTF-8"):
    describe.describe(config, progress=False)

  _write_jsonl(source, [{"key": k, "description": f"a photo of {k}"} for k in keys])
  path = describe.describe(config, progress=False)
  table = store_lib.read_descriptions(path)
  assert sorted(table) == sorted(keys) and table[keys[2]] == [f"a photo of {keys[2]}"]
  mtime = os.path.getmtime(path)
  assert describe.describe(config, progress=False) == path and os.path.getmtime(path) == mtime
  other = _cifar_config(tmp_path, cifar_shard, backend="llm-class-prompts")
  with pytest.raises(ValueError, match="Point describe.output_dir elsewhere"):
    describe.describe(other, progress=False)
  # The captioner backend (tested end to end in test_hive.py) needs a captioner run.
  no_captioner = _cifar_config(tmp_path, cifar_shard, backend="vlpre-captioner")
  no_captioner.describe.captioner = dict(config="", workdir="")
  with pytest.raises(ValueError, match="needs describe.captioner.config"):
    describe.describe(no_captioner)


@pytest.mark.slow
def test_llm_class_prompts_give_distinct_descriptions_and_match_the_decoder():
  settings = {"llm": "smollm2-135m", "per_class": 2, "max_new_tokens": 4, "temperature": 1.0,
              "top_k": 50, "seed": 0, "system": describe.DEFAULT_SYSTEM,
              "prompts": list(describe.DEFAULT_PROMPTS[:1])}
  per_class = describe.class_descriptions(settings, ["cat", "ship"], progress=False)
  flat = [text for texts in per_class for text in texts]
  assert len(flat) == 4 and all(flat) and len(set(flat)) == 4, per_class

  # Greedy decoding with the KV cache = argmax of the full (uncached) decoder, teacher-forced.
  llm = describe.load_llm(llm_lib.config_section("smollm2-135m"))
  prompts = [describe.chat_prompt(f"Describe a {c}.", "Be brief.") for c in ("cat", "airplane",
                                                                             "ship")]
  greedy = describe.generate(llm_lib.config_section("smollm2-135m"), prompts,
                             samples_per_prompt=1, max_new_tokens=12, temperature=0.0, top_k=0,
                             seed=0, progress=False)
  tokenizer = llm.tokenizer
  # The tokens describe's own KV-cache decoder produced before it moved onto vlpre.llm's
  # one decoder (same prompts, greedy, 12 tokens): the move changed nothing.
  assert [tokenizer.encode(g[0]) for g in greedy] == [
      [49, 2644, 314, 253, 26061, 12251, 351, 253, 33391, 10078, 28, 253],
      [504, 18117, 314, 253, 12985, 282, 2148, 4665, 338, 553, 9543, 260],
      [49, 5575, 314, 253, 10364, 2724, 288, 3631, 701, 28, 5503, 28]]
  ids = [tokenizer.encode(p + g[0])
         for p, g in zip(prompts, greedy)]
  width = max(map(len, ids))
  ids_BxL = np.array([x + [tokenizer.pad_id] * (width - len(x)) for x in ids], np.int32)
  mask_BxL = np.array([[1] * len(x) + [0] * (width - len(x)) for x in ids], np.int32)
  logits_BxLxV = jax.jit(functools.partial(llm.module.apply, return_logits=True))(
      {"params": llm.params}, ids_BxL, mask_BxL).logits
  next_BxL = np.asarray(jnp.argmax(logits_BxLxV, -1))
  for row, (prompt, text) in enumerate(zip(prompts, greedy)):
    start = len(tokenizer.encode(prompt))
    generated = ids[row][start:]
    assert generated and tokenizer.decode(generated) == text[0]
    np.testing.assert_array_equal(next_BxL[row, start - 1:len(ids[row]) - 1], generated)


# ------------------------------------------------------------------ stages 2 + 3: train


@pytest.mark.integration
def test_two_steps_with_the_text_loss_on_8_devices(cifar_shard, tmp_path, data_dir):
  keys = _shard_keys(cifar_shard)
  config = _cifar_config(tmp_path, cifar_shard)
  config.describe.precomputed = str(tmp_path / "given.jsonl")
  # Two images share each description, as class-level descriptions do.
  _write_jsonl(config.describe.precomputed,
               [{"key": k, "description": f"a small photo of thing number {i // 2}"}
                for i, k in enumerate(keys)])
  describe.describe(config, progress=False)
  config.text_encoder.max_len = 16
  config.text_cache = str(tmp_path / "store")
  store = store_lib.build_store(config, progress=False, shard_size=10, batch_size=8)
  assert len(store) == 16 and store.dim == 384
  np.testing.assert_array_equal(store.lookup(keys[0]), store.lookup(keys[1]))
  assert not np.allclose(store.lookup(keys[0]), store.lookup(keys[2]))

  config.mesh = (("data", 2), ("fsdp", 4), ("tensor", 1))
  config.batch_size, config.total_steps, config.log_every = 16, 2, 1
  config.optim.warmup_steps = 1
  config.model.width = 4
  config.evals = {"classify": dict(config.evals.classify, max_examples=32, image_size=32,
                                   resize_size=36, batch_size=16, data_dir=data_dir)}
  final = train.run(config, str(tmp_path / "run"))
  assert math.isfinite(final["loss"]) and math.isfinite(final["text_infonce/loss"])
  assert 0.0 <= final["classify/top1"] <= 1.0 and final["classify/num_examples"] == 32
  rows = metrics.read_metrics(str(tmp_path / "run"))
  assert [r["step"] for r in rows if "loss" in r][:2] == [1, 2]

  # The CE-only switch: no projector, no store lookup, no text term.
  config.text_loss_weight = 0.0
  assert dict(config.losses)["text_infonce"] == 0.0
  assert classifier.build(config).model.text_dim == 0
  assert classifier.input_extras(config).keys == ()
