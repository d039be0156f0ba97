"""Elastic resume: a checkpoint resumes under another mesh or process count.

The state is restored into the new mesh's shardings (parameters bit for bit); the input
continues exactly under the same process count and from `vlpre.data.data_position`'s record
under another one.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
import pytest

from vlpre import checkpoint, data, init_params, methods, metrics, sharding, stages, train
from vlpre import train_state

from tests import helpers


def _config(data_dir, total_steps):
  config = helpers.tiny_clip_config(data_dir, total_steps=total_steps)  # data=2, fsdp=4
  config.evals = {}
  return config


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory, data_dir):
  """An uninterrupted 6-step run on 8 devices (data=2, fsdp=4): its losses."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.run(_config(data_dir, 6), workdir)
  return _losses(workdir)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}


def _saved_params(workdir, step):
  directory = os.path.join(workdir, "checkpoints")
  handlers = {"state": ocp.StandardCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers) as m:
    state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return jax.tree.map(np.asarray, state["params"])


def test_data_position_rule():
  assert data.data_position({}, 0, 16, 1) == (0, True)  # a fresh run
  assert data.data_position({}, 5, 16, 1) == (0, True)  # a checkpoint from before the rule
  same = {"data_process_count": 2, "data_start_record": 40}
  assert data.data_position(same, 9, 16, 2) == (40, True)  # saved iterator state continues
  assert data.data_position(same, 9, 16, 4) == (144, False)  # 9 steps x 16 records
  assert data.data_position(same, 9, 16, 1) == (144, False)
  with pytest.raises(ValueError, match="batch_size 16 does not split over 3 processes"):
    data.data_position(same, 9, 16, 3)


def test_a_stream_started_at_a_record_equals_the_later_batches_of_a_fresh_one(data_dir):
  """The new-count rule's exactness: process 1 of 2 started at global record step x
  global_batch reads the batches a fresh 2-process run's process 1 reads from step `step`
  on, augmentations included."""
  config = _config(data_dir, 1)
  config.input.augment, config.input.flip = "random_resized_crop", True
  kwargs = dict(global_batch_size=8, seed=3, tokenizer=methods.build_tokenizer(config),
                process_index=1, process_count=2)
  fresh = iter(data.build_train_dataset(config.input, **kwargs))
  expected = [next(fresh) for _ in range(5)][3:]
  restarted = iter(data.build_train_dataset(config.input, start_record=3 * 8, **kwargs))
  for want in expected:
    got = next(restarted)
    assert list(got["_key"]) == list(want["_key"])
    np.testing.assert_array_equal(got["image"], want["image"])
  with pytest.raises(ValueError, match="start_record must be >= 0"):
    data.build_train_dataset(config.input, start_record=-1, **kwargs)


@pytest.mark.integration
def test_resume_under_another_mesh_and_on_half_the_devices(tmp_path, data_dir, straight_losses):
  workdir = str(tmp_path / "elastic")
  train.run(_config(data_dir, 3), workdir)  # data=2, fsdp=4 on 8 devices; saves step 3
  saved = _saved_params(workdir, 3)

  # Restored under data=1, fsdp=4 on 4 devices and data=4, fsdp=2 on 8: the same bits.
  example = next(iter(helpers_dataset(_config(data_dir, 3))))
  for mesh_axes, devices in (((("data", 1), ("fsdp", 4)), jax.devices()[:4]),
                             ((("data", 4), ("fsdp", 2)), jax.devices())):
    config = _config(data_dir, 3)
    config.mesh = mesh_axes
    s = train_state.setup(config, example, mesh=sharding.make_mesh(config.mesh, devices))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    restored = ckpt.restore_state_only(3, train_state.with_shardings(s.state, s.state_shardings))
    ckpt.close()
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved)):
      assert got.sharding.mesh.shape == s.mesh.shape and len(got.devices()) <= len(devices)
      np.testing.assert_array_equal(np.asarray(got), want)
    assert int(restored.step) == 3

  # Training goes on on 4 devices from the next batch: the losses of an uninterrupted
  # 8-device run up to float reassociation (the reductions run over another mesh).
  config = _config(data_dir, 6)
  config.mesh = (("data", 1), ("fsdp", 4))  # a mesh change needs no allowing; 3 more steps do
  train.run(config, workdir, devices=jax.devices()[:4], allow_config_change=("total_steps",))
  a, b = straight_losses, _losses(workdir)
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    np.testing.assert_allclose(b[step], a[step], rtol=1e-5, err_msg=f"step {step}")
  spread = np.diff(sorted(a.values()))
  assert spread.min() > 1e-5 * max(a.values()), a  # another batch would show


@pytest.mark.integration
def test_resume_under_another_process_count_starts_at_the_documented_record(
    tmp_path, data_dir, straight_losses):
  """A checkpoint marked as written by 2 processes resumes in this one process at global
  record 3 x 16 = 48: where the uninterrupted run is after 3 steps, so the losses equal."""
  workdir = str(tmp_path / "two_processes")
  train.run(_config(data_dir, 3), workdir)
  counters = os.path.join(workdir, "checkpoints", "3", "counters", "metadata")
  with open(counters, encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["data_process_count"] == 1 and saved["data_start_record"] == 0
  with open(counters, "w", encoding="utf-8") as f:  # as 2 processes would have written it
    json.dump({**saved, "data_process_count": 2}, f)
  train.run(_config(data_dir, 6), workdir, allow_config_change=("total_steps",))
  b = _losses(workdir)
  assert sorted(b) == [1, 2, 3, 4, 5, 6] and b == straight_losses
  with open(os.path.join(workdir, "checkpoints", "6", "counters", "metadata"),
            encoding="utf-8") as f:
    assert json.load(f)["data_start_record"] == 48  # kept for a later same-count resume


def helpers_dataset(config):
  return data.build_train_dataset(config.input, global_batch_size=config.batch_size,
                                  seed=config.seed, tokenizer=methods.build_tokenizer(config))


@pytest.mark.integration
def test_a_staged_init_from_stage_resumes_under_another_mesh(tmp_path, data_dir, monkeypatch):
  """Stage b starts from stage a's export (`init_from.params`) with the image tower frozen.
  Stopped inside b after its first step and resumed under data=4, fsdp=2: its frozen tower
  is stage a's export bit for bit, and it ends where the uninterrupted run does (float
  reassociation aside), its losses too."""
  config = _config(data_dir, 1)
  config.checkpoint.every_steps = 1
  config.stages = (dict(name="a", steps=2), dict(name="b", steps=3, frozen=("img/.*",)))
  straight = str(tmp_path / "straight")
  stages.run(config, straight)

  elastic = str(tmp_path / "elastic")
  helpers.stop_inside_stage(monkeypatch, "1_b")
  stages.run(config, elastic)
  assert train.stop_requested()
  assert not os.path.exists(os.path.join(elastic, "1_b", "final_params"))
  assert "1" in os.listdir(os.path.join(elastic, "1_b", "checkpoints"))  # b's step 1 is saved
  config.mesh = (("data", 4), ("fsdp", 2), ("tensor", 1))  # a mesh change needs no allowing
  stages.run(config, elastic)
  with open(os.path.join(elastic, "1_b", "config.json"), encoding="utf-8") as f:
    changes = json.load(f)["changes"]  # resumed inside stage b at its step 1, on the new mesh
  assert [(c["step"], sorted(c["fields"])) for c in changes] == [(1, ["mesh"])], changes

  def final(workdir, stage):
    flat = traverse_util.flatten_dict(
        init_params.load_params(os.path.join(workdir, stage, "final_params")), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}

  got, want, stage_a = final(elastic, "1_b"), final(straight, "1_b"), final(elastic, "0_a")
  assert sorted(got) == sorted(want) and any(k.startswith("img/") for k in got)
  for k in got:
    if k.startswith("img/"):
      np.testing.assert_array_equal(got[k], stage_a[k], err_msg=k)
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)  # key biases: noise
  assert any(not np.array_equal(got[k], stage_a[k]) for k in got if k.startswith("txt/"))
  a, b = _losses(os.path.join(straight, "1_b")), _losses(os.path.join(elastic, "1_b"))
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-5)
