"""LIFT: the frozen LLM inside the sharded step, and online vs cached text embeddings."""
import copy

import jax
import numpy as np
import pytest

from vlpre import config_lib, methods, train, train_state
from vlpre import sharding
from vlpre.data import train_input
from vlpre.evaluators import common
from vlpre.text_encoders import store as store_lib

from tests import helpers


def lift_config(data_dir, shard, encoder="smollm2-135m", mode="online"):
  c = helpers.tiny_clip_config(data_dir, total_steps=2)
  c.input.train = shard
  c.input.max_text_len = 16
  c.model_name = "lift"
  c.model = dict(image=dict(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=8),
                 head_hidden=128)
  del c["tokenizer"]
  c.text_encoder = dict(name=encoder, max_len=16, pooling="", normalize=True, template="{text}",
                        layer=-1, center=False,
                        dtype="float32")
  c.text_mode = mode
  c.text_cache = ""
  c.frozen = ("txt_encoder/.*", "txt_mean")
  c.min_fsdp_size = 2**16
  c.evals = {k: v for k, v in c.evals.items() if k != "probe"}
  return c


@pytest.fixture(scope="module")
def shard(data_dir, tmp_path_factory):
  return helpers.small_shard(data_dir, tmp_path_factory.mktemp("lift"), num_samples=16)


def _first_batch(config):
  extras = methods.input_extras(config)
  ds = train_input.build_train_dataset(
      config.input, global_batch_size=config.batch_size, seed=config.seed,
      tokenizer=methods.build_tokenizer(config) if extras.tokenize else None,
      extra_transforms=extras.transforms, extra_keys=extras.keys, stream=extras.stream)
  return next(iter(ds))


@pytest.mark.slow
def test_online_and_cached_modes_give_the_same_loss(data_dir, shard, tmp_path):
  online = lift_config(data_dir, shard)
  cached = copy.deepcopy(online)
  cached.text_mode = "cached"  # text_cache "": the store goes under the run's workdir
  cached = config_lib.with_workdir(cached, str(tmp_path / "run"))
  store = store_lib.build_store(cached, progress=False, shard_size=10)
  assert len(store) == 16 and store.meta["num_shards"] == 2
  assert store.directory.startswith(str(tmp_path / "run" / "embeddings" / "smollm2-135m-L16-"))

  online_batch, cached_batch = _first_batch(online), _first_batch(cached)
  np.testing.assert_array_equal(online_batch["image"], cached_batch["image"])
  assert "txt_emb" in cached_batch and "text" not in cached_batch
  assert "text" in online_batch and "txt_emb" not in online_batch

  losses = []
  for config, batch in ((online, online_batch), (cached, cached_batch)):
    s = train_state.setup(config, batch)
    step = s.jit_train_step()
    _, metrics = step(s.state, s.frozen, s.device_batch(batch), jax.random.key(0))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_the_store_defaults_under_the_workdir_and_only_runs_that_read_it_need_one(
    data_dir, shard):
  """`text_cache: ""`: <workdir>/embeddings/<encoder>-L<max_len>-<hash>, a gs:// workdir's
  stays a URI; vlpre.embed skips runs that read no store (online LIFT without centring,
  a config without a text encoder)."""
  config = lift_config(data_dir, shard, encoder="minilm-l6", mode="cached")
  with pytest.raises(ValueError, match="no workdir to keep the embedding store in"):
    store_lib.cache_dir(config)
  run = config_lib.with_workdir(config, "gs://bucket/runs/lift")
  assert "workdir" not in config  # the caller's config is left as it was
  assert store_lib.cache_dir(run).startswith("gs://bucket/runs/lift/embeddings/minilm-l6-L16-")
  assert config_lib.with_workdir(run, "gs://bucket/runs/lift/0_stage") is run  # stages: the run's
  lift = methods.of(config)
  assert lift.reads_embedding_store(config)
  config.text_mode = "online"
  config.text_encoder.center = False
  assert not lift.reads_embedding_store(config)
  config.text_encoder.center = True  # centring reads the store's mean
  assert lift.reads_embedding_store(config)
  clip = helpers.tiny_clip_config(data_dir)
  assert not methods.of(clip).reads_embedding_store(clip)


@pytest.mark.slow
def test_store_refuses_other_encoder_settings(data_dir, shard, tmp_path):
  config = lift_config(data_dir, shard, encoder="minilm-l6", mode="cached")
  config.text_cache = str(tmp_path / "store")
  store_lib.build_store(config, progress=False)
  config.text_encoder.max_len = 32
  with pytest.raises(ValueError, match="built with"):
    store_lib.EmbeddingStore(config.text_cache, store_lib.encoder_settings(config))


@pytest.mark.integration
def test_lift_two_steps_with_the_llm_sharded_over_8_devices(data_dir, shard, tmp_path):
  config = lift_config(data_dir, shard)
  final = train.run(config, str(tmp_path / "run"))
  assert np.isfinite(final["loss"]) and "retrieval/i2t_R@1" in final
  s = train_state.setup(config, _first_batch(config))
  frozen_leaves = jax.tree_util.tree_flatten_with_path(s.frozen)[0]
  big = [(p, x) for p, x in frozen_leaves if x.size >= config.min_fsdp_size]
  assert big, "the LLM has weights above the fsdp threshold"
  for path, x in big:  # every large LLM weight is split over fsdp, none replicated
    assert "fsdp" in str(x.sharding.spec), (jax.tree_util.keystr(path), x.sharding.spec)
  # Frozen weights never enter the optimizer state.
  opt_leaves = sum(x.size for x in jax.tree.leaves(s.state.opt_state))
  trainable = sum(x.size for x in jax.tree.leaves(s.state.params))
  assert opt_leaves <= 2 * trainable + 16


@pytest.mark.slow
def test_embed_shards_the_encoder_over_the_mesh(data_dir, shard):
  from vlpre import sharding  # pylint: disable=g-import-not-at-top
  config = lift_config(data_dir, shard)
  encoder = store_lib.text_encoder(config)
  mesh = sharding.make_mesh(config.mesh)
  params, apply, rules = store_lib.sharded_encoder(config, encoder, mesh)
  big = [x for x in jax.tree.leaves(params) if x.size >= config.min_fsdp_size]
  assert big and all("fsdp" in str(x.sharding.spec) for x in big)  # nothing replicated
  ids_BxL, mask_BxL = encoder.tokenizer.encode_batch(["a dog .", "two cats on a mat ."] * 4, 16)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  with sharding.active(mesh, rules):
    sharded = apply(params, ids_BxL, mask_BxL)
  np.testing.assert_allclose(sharded, encoder.embed(["a dog .", "two cats on a mat ."] * 4),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_centred_targets_match_online_and_cached(data_dir, shard, tmp_path):
  online = lift_config(data_dir, shard, encoder="minilm-l6")
  online.text_encoder.center = True
  online.text_cache = str(tmp_path / "store")
  cached = copy.deepcopy(online)
  cached.text_mode = "cached"
  store = store_lib.build_store(cached, progress=False)
  rows = np.concatenate([np.load(tmp_path / "store" / f"emb-{i:05d}.npy")
                         for i in range(store.meta["num_shards"])])
  np.testing.assert_allclose(store.mean(), rows.mean(axis=0), rtol=1e-5, atol=1e-7)
  losses = []
  for config in (online, cached):
    batch = _first_batch(config)
    s = train_state.setup(config, batch)
    np.testing.assert_allclose(s.frozen["txt_mean"], store.mean())  # frozen, from the store
    assert "txt_mean" not in s.state.params
    _, metrics = s.jit_train_step()(s.state, s.frozen, s.device_batch(batch), jax.random.key(0))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  # Centring changed the targets: the uncentred loss differs.
  plain = copy.deepcopy(cached)
  plain.text_encoder.center = False
  batch = _first_batch(plain)
  s = train_state.setup(plain, batch)
  _, metrics = s.jit_train_step()(s.state, s.frozen, s.device_batch(batch), jax.random.key(0))
  assert abs(float(metrics["loss"]) - losses[1]) > 1e-4


def _counting(fn, calls):
  def wrapped(*args):
    calls.append(1)
    return fn(*args)
  return wrapped


@pytest.mark.slow
def test_frozen_text_is_embedded_once_per_run(data_dir, shard):
  """The evaluators' texts go through the frozen encoder once: the image tower training
  does not change them; other encoder weights do."""
  config = lift_config(data_dir, shard, encoder="minilm-l6")
  s = train_state.setup(config, _first_batch(config))
  predictor = common.Predictor(s, methods.build_tokenizer(config))
  inputs = predictor.fixed_text_inputs
  assert inputs and all(p.startswith("params/txt_encoder/") for p in inputs), inputs
  calls = []
  predictor._embed_text = _counting(predictor._embed_text, calls)  # pylint: disable=protected-access
  texts = [f"a photo of {n} dogs on the grass" for n in range(16)]
  first = predictor.text_embeddings(s.variables(), texts, 16)
  embedded = len(calls)
  assert embedded >= 1
  first[:] = 0  # the caller's copy; the cached one is untouched
  image_trained = s.state.replace(params=jax.tree.map(lambda x: x + 1.0, s.state.params))
  again = predictor.text_embeddings(s.variables(image_trained), texts, 16)
  assert len(calls) == embedded and np.abs(again).sum() > 0
  predictor.text_embeddings(s.variables(), texts[:8], 16)  # other texts: embedded
  assert len(calls) > embedded
  embedded = len(calls)
  # Other frozen weights (another run's encoder): embedded again, to other values.
  other = {**s.variables(), "params": jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0.5 if "txt_encoder" in jax.tree_util.keystr(path) else x,
      s.variables()["params"])}
  changed = predictor.text_embeddings(other, texts, 16)
  assert len(calls) > embedded and not np.allclose(changed, again)
  embedded = len(calls)
  np.testing.assert_array_equal(predictor.text_embeddings(other, texts, 16), changed)
  assert len(calls) == embedded
