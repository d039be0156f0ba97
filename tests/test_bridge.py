"""Bridge training: random labels, the LLM-block backbone, partial freezing on 8 devices."""
import collections
import os

import jax
import numpy as np
import pytest

from vlpre import checkpoint
from vlpre import config_lib
from vlpre import llm as llm_lib
from vlpre import train
from vlpre import train_state
from vlpre.data import train_input
from vlpre.methods.bridge import model as bridge

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bridge_config(data_dir, shard, arg="tiny,freeze=last2"):
  """configs/bridge.py at test size; by default partial bridging (the last 2 blocks frozen)."""
  c = config_lib.load(os.path.join(ROOT, "configs", "bridge.py") + ":" + arg)
  c.input.train = shard
  c.input.data_dir = data_dir
  c.batch_size, c.total_steps, c.log_every = 16, 2, 1
  c.mesh = (("data", 2), ("fsdp", 4), ("tensor", 1))
  c.min_fsdp_size = 2**16
  c.model.patch_size = 4
  c.optim.warmup_steps = 0
  small = dict(max_examples=32, batch_size=16, data_dir=data_dir, test_data=shard, data=shard,
               train_data=shard, max_train_examples=32)
  c.evals = {name: {k: v for k, v in dict(e, **small).items()
                    if k in e or k in ("data_dir", "max_examples", "batch_size")}
             for name, e in c.evals.items()}
  if "classify" not in c.evals:
    c.evals["classify"] = dict(kind="classification", data=shard, image_size=32, resize_size=32,
                               **{k: small[k] for k in ("max_examples", "batch_size", "data_dir")})
  return c


@pytest.fixture(scope="module")
def shard(data_dir, tmp_path_factory):
  return helpers.small_shard(data_dir, tmp_path_factory.mktemp("bridge"),
                             pattern="cifar10/train-00000.tar", num_samples=32)


def test_random_label_statistics_and_determinism():
  keys = [f"img_{i}" for i in range(6000)]
  labels = np.arange(6000) % 10
  full = [bridge.random_label(k, y, ratio=1.0, num_classes=10, seed=0) for k, y in zip(keys, labels)]
  assert all(new != old for new, old in zip(full, labels))  # ratio 1: every label moves
  offsets = collections.Counter((new - old) % 10 for new, old in zip(full, labels))
  assert set(offsets) == set(range(1, 10))  # ... to each other class, about equally
  assert max(offsets.values()) < 1.25 * 6000 / 9 and min(offsets.values()) > 0.75 * 6000 / 9
  part = [bridge.random_label(k, y, ratio=0.3, num_classes=10, seed=0) for k, y in zip(keys, labels)]
  assert abs(np.mean(np.array(part) != labels) - 0.3) < 0.03
  unlabelled = collections.Counter(bridge.random_label(k, None, ratio=1.0, num_classes=10, seed=0)
                                   for k in keys)
  assert set(unlabelled) == set(range(10)) and max(unlabelled.values()) < 1.25 * 600
  again = [bridge.random_label(k, y, ratio=1.0, num_classes=10, seed=0) for k, y in zip(keys, labels)]
  other_seed = [bridge.random_label(k, y, ratio=1.0, num_classes=10, seed=1)
                for k, y in zip(keys, labels)]
  assert again == full and other_seed != full
  assert bridge.random_label("x", 3, ratio=0.0, num_classes=10, seed=0) == 3
  with pytest.raises(ValueError):
    bridge.RandomLabels(1.5, 10, 0)


def test_random_labels_in_the_pipeline_are_exact_across_resume(data_dir, shard):
  config = bridge_config(data_dir, shard)
  extras = bridge.input_extras(config)

  def dataset():
    return train_input.build_train_dataset(config.input, global_batch_size=8, seed=0, tokenizer=None,
                                        extra_transforms=extras.transforms, extra_keys=extras.keys)

  it = iter(dataset())
  first = next(it)
  true_labels = next(iter(train_input.build_train_dataset(
      config.input, global_batch_size=8, seed=0, tokenizer=None)))["label"]
  assert (first["label"] != true_labels).all()  # ratio 1.0 on labelled CIFAR-10
  state = it.get_state()
  expected = [next(it)["label"] for _ in range(3)]
  resumed = iter(dataset())
  resumed.set_state(state)
  np.testing.assert_array_equal([next(resumed)["label"] for _ in range(3)], expected)


@pytest.mark.slow
def test_llm_blocks_take_patch_embeddings_causal_or_bidirectional():
  config = llm_lib.DecoderConfig(vocab_size=7, hidden_size=16, intermediate_size=24, num_layers=2,
                                 num_heads=2, num_kv_heads=1, head_dim=8)
  image = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  for causal in (True, False):
    model = bridge.Model(llm=llm_lib.Decoder(config, causal=causal), num_classes=5, patch_size=4)
    variables = model.init(jax.random.key(0), {"image": image})
    assert "embed_tokens" not in variables["params"]["llm"]  # embeddings in, no token table
    out = model.apply(variables, {"image": image})
    assert out["logits"].shape == (2, 5) and out["feature"].shape == (2, 16)
    # Causal + last-token pooling sees every patch; change the first patch, the feature moves.
    poked = image.copy()
    poked[:, :4, :4] += 1.0
    moved = model.apply(variables, {"image": poked})["feature"]
    assert not np.allclose(moved, out["feature"])


@pytest.mark.integration
def test_two_steps_partial_bridge_on_8_devices(data_dir, shard, tmp_path):
  config = bridge_config(data_dir, shard)
  batch = next(iter(train_input.build_train_dataset(
      config.input, global_batch_size=config.batch_size, seed=0, tokenizer=None,
      extra_transforms=bridge.input_extras(config).transforms)))
  s = train_state.setup(config, batch)
  assert set(s.frozen["llm"]) == {"layers_2to3"} and "layers_0to1" in s.state.params["llm"]
  pretrained = llm_lib.load("smollm2-135m", num_layers=4, layer_groups=(2, 2), tokens=False,
                            lm_head=False).params
  np.testing.assert_array_equal(s.frozen["llm"]["layers_2to3"]["mlp"]["up_proj"]["kernel"],
                                pretrained["layers_2to3"]["mlp"]["up_proj"]["kernel"])
  big = [x for x in jax.tree.leaves(s.state.params) if x.size >= config.min_fsdp_size]
  assert big and all("fsdp" in str(x.sharding.spec) for x in big)
  frozen_before = jax.tree.map(np.asarray, s.frozen)
  trainable_before = jax.tree.map(np.asarray, s.state.params)
  step = s.jit_train_step()
  state, metrics = step(s.state, s.frozen, s.device_batch(batch), jax.random.key(0))
  state, metrics = step(state, s.frozen, s.device_batch(batch), jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, s.frozen), frozen_before)
  moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b),
                       state.params["llm"]["layers_0to1"], trainable_before["llm"]["layers_0to1"])
  assert all(jax.tree.leaves(moved))
  final = train.run(config, str(tmp_path / "run"))  # the real loop, evaluators included
  assert np.isfinite(final["loss"]) and 0 <= final["classify/top1"] <= 1
  assert 0 <= final["linear_probe/top1"] <= 1

  # Stage 2: fine-tune from the partial bridge's checkpoint, which holds only the trained
  # blocks; the frozen ones come from the pretrained LLM, the head starts afresh.
  ft = bridge_config(data_dir, shard, "tiny,finetune,freeze=last2")
  ft.init_from.workdir = str(tmp_path / "run")
  ft.total_steps = 1
  assert ft.bridge.random_label_ratio == 0 and not ft.frozen
  bridged = checkpoint.restore_params(str(tmp_path / "run"), ("llm", "patch_embed"))
  assert set(bridged["llm"]) == {"layers_0to1", "norm"}  # the trainable part only
  s2 = train_state.setup(ft, batch)
  assert not jax.tree.leaves(s2.frozen)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, s2.state.params["llm"]),
               {**frozen_before["llm"], **bridged["llm"]})
  np.testing.assert_array_equal(s2.state.params["patch_embed"]["kernel"],
                                bridged["patch_embed"]["kernel"])
  assert not np.asarray(s2.state.params["head"]["kernel"]).any()  # zero-initialised head
  train.run(ft, str(tmp_path / "ft"))
  from vlpre import metrics  # pylint: disable=g-import-not-at-top
  rows = metrics.read_metrics(str(tmp_path / "ft"))
  probe_steps = [r["step"] for r in rows if "linear_probe/top1" in r]
  classify_steps = [r["step"] for r in rows if "classify/top1" in r]
  assert probe_steps == [0] and classify_steps == [1]  # at_start only; at the end only


def test_layer_decay_scales_each_block_update():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vlpre import optim  # pylint: disable=g-import-not-at-top
  decay = 0.5
  params = {"patch_embed": {"kernel": np.ones((2, 3))},
            "llm": {"layers_0to1": {"w": np.ones((2, 3, 3))}, "layers_2to3": {"w": np.ones((2, 3))},
                    "norm": {"scale": np.ones(3)}},
            "head": {"kernel": np.ones((3, 4))}}
  grads = jax.tree.map(np.ones_like, params)
  cfg = ml_collections.ConfigDict(dict(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
                                       warmup_steps=0, schedule="constant", layer_decay=decay))
  tx, _ = optim.build_optimizer(cfg, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  # 4 blocks: block i scaled decay^(4 - i); embeddings decay^5; norm and head 1.
  np.testing.assert_allclose(updates["patch_embed"]["kernel"], -decay**5)
  np.testing.assert_allclose(updates["llm"]["layers_0to1"]["w"][0], -decay**4)
  np.testing.assert_allclose(updates["llm"]["layers_0to1"]["w"][1], -decay**3)
  np.testing.assert_allclose(updates["llm"]["layers_2to3"]["w"][1], -decay**1)
  np.testing.assert_allclose(updates["llm"]["norm"]["scale"], -1.0)
  np.testing.assert_allclose(updates["head"]["kernel"], -1.0)
