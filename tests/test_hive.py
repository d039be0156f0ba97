"""HIVE: the captioner (hierarchical cross-attention and the SA cascade), staged training
on 8 devices (frozen parameters bit-identical per stage, exact resume inside a stage) and
the captioning evaluator's decoding."""
import os

import jax
import numpy as np
import pytest

from vlpre import config_lib, data, init_params, methods, metrics, stages, train, train_state
from vlpre.evaluators import captioning, common
from vlpre.llm import generate as generate_lib

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hive_config(data_dir, shard, cifar_shard, mode="hive", steps=(1, 1, 1)):
  """configs/hive.py:tiny at test size: SmolLM2's first 2 layers, a 2-block ViT."""
  c = config_lib.load(os.path.join(ROOT, "configs", "hive.py") + f":tiny,mode={mode}")
  c.input.train, c.input.data_dir = shard, data_dir
  c.input.image_size, c.input.resize_size, c.input.max_text_len = 32, 32, 16
  c.model.image = dict(patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, pool="mean")
  c.hive.llm.num_layers, c.hive.pairs = 2, ((1, 1), (2, 2))
  c.batch_size, c.log_every = 8, 1
  c.mesh = (("data", 2), ("fsdp", 4), ("tensor", 1))
  c.min_fsdp_size = 2**16
  c.stages = tuple(dict(s, steps=n, optim=dict(s["optim"], warmup_steps=0))
                   for s, n in zip(c.stages, steps))
  small = dict(image_size=32, resize_size=32, batch_size=8, data_dir=data_dir, max_examples=8)
  c.evals = {
      "captioning": dict(c.evals.captioning, data=shard, max_new_tokens=4, **small),
      "linear_probe": dict(c.evals.linear_probe, train_data=cifar_shard, test_data=cifar_shard,
                           max_train_examples=16, **small)}
  return c


@pytest.fixture(scope="module")
def shards(data_dir, tmp_path_factory):
  return (helpers.small_shard(data_dir, tmp_path_factory.mktemp("flickr"), num_samples=16),
          helpers.small_shard(data_dir, tmp_path_factory.mktemp("cifar"),
                              pattern="cifar10/train-00000.tar", num_samples=16))


def _batch(config):
  return next(iter(data.build_train_dataset(
      config.input, global_batch_size=config.batch_size, seed=0,
      tokenizer=methods.build_tokenizer(config))))


def _flat(tree):
  from flax import traverse_util
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.mark.slow  # over 20 s on 2 cores
@pytest.mark.parametrize("mode", ["hive", "sa"])
def test_captioner_loss_reaches_the_image_and_greedy_decoding_matches_the_forward(
    mode, data_dir, shards):
  config = hive_config(data_dir, *shards, mode=mode)
  batch = _batch(config)
  s = train_state.setup(config, batch)
  names = set(_flat(s.state.params))
  projectors = {n.split("/")[0] for n in names if n.startswith("proj_")}
  assert projectors == ({"proj_1to1", "proj_2to2"} if mode == "hive" else {"proj_sa"})
  model, variables = s.model, jax.device_get(s.variables(s.state))
  out = model.apply(variables, {k: np.asarray(v) for k, v in batch.items() if not k.startswith("_")})
  assert out["lm_logits"].shape[:2] == batch["text"].shape  # every caption token predicted
  poked = dict(batch, image=np.asarray(batch["image"]) + 1.0)
  moved = model.apply(variables, {k: np.asarray(v) for k, v in poked.items() if not k.startswith("_")})
  assert not np.allclose(moved["lm_logits"], out["lm_logits"], atol=1e-4)  # the image matters
  # The evaluator's cached greedy decoding = argmax of the full forward on its own output.
  evaluator = captioning.Evaluator("captioning", config.evals["captioning"],
                                   common.Predictor(s, None))
  images = np.asarray(batch["image"])[:2]
  cond = model.apply(variables, images, method="caption_inputs")
  tokens = [rows[0] for rows in generate_lib.generate(
      s.built.llm, np.asarray(cond["prompt_ids"]).tolist(), max_new_tokens=4, stop_ids=[],
      params=variables["params"]["llm"], embeddings=cond.get("embeddings"),
      embeddings_mask=cond.get("embeddings_mask"), extra_kv=cond.get("extra_kv"))]
  forced = model.apply(variables, {"image": images, "text": np.array(tokens, np.int32),
                                   "text_mask": np.ones((2, 4), np.int32)})
  np.testing.assert_array_equal(np.argmax(forced["lm_logits"], -1), np.array(tokens))
  texts = evaluator.captions(variables, images)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.integration
def test_stages_freeze_what_they_say_and_resume_inside_a_stage(data_dir, shards, tmp_path,
                                                               monkeypatch):
  config = hive_config(data_dir, *shards, steps=(1, 2, 1))
  workdir = str(tmp_path / "run")
  stages.run(config, workdir)
  dirs = [stages.stage_dir(workdir, i, st) for i, st in enumerate(config.stages)]
  s0 = train_state.setup(stages.stage_config(config, 0, workdir), _batch(config))
  init = _flat(s0.variables(s0.state)["params"])
  after = [_flat(init_params.load_params(os.path.join(d, "final_params"))) for d in dirs]

  def changed(a, b, prefix):
    return {k for k in a if k.startswith(prefix) and not np.array_equal(a[k], b[k])}

  # Stage 1: projectors only. Stage 2: + LLM. Stage 3: everything, the ViT included.
  assert changed(init, after[0], "proj_") and not changed(init, after[0], "llm/")
  assert not changed(init, after[0], "img/")
  assert changed(after[0], after[1], "llm/") and not changed(after[0], after[1], "img/")
  assert changed(after[1], after[2], "img/")
  def eval_steps(key):  # (stage, step) of each evaluation
    return [(i, r["step"]) for i, d in enumerate(dirs) for r in metrics.read_metrics(d) if key in r]

  assert eval_steps("linear_probe/top1") == [(0, 0), (2, 1)]  # before stage 1, after stage 3
  assert eval_steps("captioning/bleu4") == [(2, 1)]

  # Killed inside stage 2 (after its first step), rerun: the same final parameters.
  other = str(tmp_path / "killed")
  helpers.stop_inside_stage(monkeypatch, "1_llm")
  stages.run(config, other)
  assert train.stop_requested() and not os.path.exists(os.path.join(other, "2_all"))
  stages.run(config, other)
  resumed = _flat(init_params.load_params(os.path.join(other, "2_all", "final_params")))
  for k in after[2]:
    np.testing.assert_array_equal(resumed[k], after[2][k], err_msg=k)

  # The trained captioner as GPT4Image's describer: one caption per training image.
  from vlpre.methods.gpt4image import describe  # pylint: disable=g-import-not-at-top
  from vlpre.text_encoders import store  # pylint: disable=g-import-not-at-top
  g = config_lib.load(os.path.join(ROOT, "configs", "gpt4image.py") + ":tiny")
  g.input.train, g.input.data_dir = shards[1], data_dir
  g.describe.backend, g.describe.output_dir = "vlpre-captioner", str(tmp_path / "descriptions")
  g.describe.max_new_tokens = 4
  g.describe.captioner = dict(config=config, workdir=workdir, batch_size=8)
  path = describe.describe(g, progress=False)
  table = store.read_descriptions(path)
  keys, _ = describe.training_samples(g)
  assert sorted(table) == sorted(keys) and all(len(v) == 1 and v[0] for v in table.values())
  assert describe.describe(g, progress=False) == path  # complete: a rerun is a no-op
