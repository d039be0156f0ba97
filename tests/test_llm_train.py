"""Training the packaged SmolLM2 with the LM loss in the one trainer, on an 8-device mesh."""
import jax
import numpy as np
import pytest

from vlpre import methods, sharding, train, train_state
from vlpre.data import train_input

from tests import helpers


def lm_config(data_dir, shard):
  c = helpers.tiny_clip_config(data_dir, total_steps=2)
  c.input.train = shard
  c.input.max_text_len = 16
  del c["tokenizer"]
  c.model_name = "lm"
  c.model = dict()
  # Two scanned groups so the first 26 layers are their own subtree, frozen by regex. The
  # last 4 and the embeddings train: the optimizer state of all 30 would put this file
  # near 10 GB resident.
  c.llm = dict(name="smollm2-135m", layer_groups=(26, 4), remat="full")
  c.frozen = ("llm/layers_0to25/.*",)
  c.losses = {"lm": 1.0}
  c.optim.update(lr=3e-4, warmup_steps=0, weight_decay=0.0)
  c.min_fsdp_size = 2**16
  c.evals = {}
  return c


@pytest.fixture(scope="module")
def shard(data_dir, tmp_path_factory):
  return helpers.small_shard(data_dir, tmp_path_factory.mktemp("lm"), num_samples=16)


@pytest.mark.integration
def test_two_steps_train_smollm2_on_captions_over_8_devices(data_dir, shard, tmp_path):
  config = lm_config(data_dir, shard)
  tokenizer = methods.build_tokenizer(config)
  batch = next(iter(train_input.build_train_dataset(
      config.input, global_batch_size=config.batch_size, seed=0, tokenizer=tokenizer)))
  eos = tokenizer.eos_id
  lengths = batch["text_mask"].sum(axis=1)
  assert all(batch["text"][i, n - 1] == eos for i, n in enumerate(lengths))  # captions end in EOS

  _two_steps_lower_the_loss_and_train_only_the_unfrozen_layers(config, batch)
  train.release_host_memory()  # the set-up above is gone before train.run builds its own

  # The whole trainer end to end: two steps, a checkpoint, finite metrics.
  final = train.run(config, str(tmp_path / "run"))
  assert np.isfinite(final["loss"]) and final["lm/accuracy"] > 0


def _two_steps_lower_the_loss_and_train_only_the_unfrozen_layers(config, batch):
  s = train_state.setup(config, batch)
  assert sharding.tree_paths(s.frozen) and all(
      p.startswith("llm/layers_0to25/") for p in sharding.tree_paths(s.frozen))
  assert "layers_26to29" in s.state.params["llm"] and "layers_0to25" not in s.state.params["llm"]
  big = [x for x in jax.tree.leaves(s.state.params) if x.size >= config.min_fsdp_size]
  assert big and all("fsdp" in str(x.sharding.spec) for x in big)
  frozen_before = jax.tree.map(np.asarray, s.frozen)
  trainable_before = jax.tree.map(np.asarray, s.state.params)

  step = s.jit_train_step()
  device_batch = s.device_batch(batch)
  state, first = step(s.state, s.frozen, device_batch, jax.random.key(0))
  state, second = step(state, s.frozen, device_batch, jax.random.key(0))
  # The same batch twice: the update lowered its next-token loss.
  assert float(second["loss"]) < float(first["loss"]), (first["loss"], second["loss"])
  assert 2.0 < float(first["loss"]) < 8.0  # a pretrained LM on captions, not a random one
  assert float(first["lm/num_tokens"]) == float((batch["text_mask"][:, 1:]).sum())
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, s.frozen), frozen_before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), state.params,
                         trainable_before)
  assert all(jax.tree.leaves(changed["llm"]["layers_26to29"]))
