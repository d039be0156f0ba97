"""Runs that describe themselves (vlpre/run_record.py): config.json at the first start, the
tools that read a run from it, and resumes whose config drifts from it."""
import glob
import json
import os
import shutil
import subprocess
import sys

from absl import flags
import numpy as np
import pytest

from vlpre import config_lib, evaluate, metrics, run_record, stages, train

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(workdir, config, example=None):
  """A first start's record, as train.run writes it."""
  run_record.write(config, str(workdir), example, None, {})
  return run_record.read(str(workdir))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_comes_back_from_its_record_as_it_was(path, tmp_path):
  """Tuples stay tuples (JSON writes lists), references their values, stages their dicts."""
  for arg in (":tiny", ""):
    config = config_lib.load(path + arg)
    _record(tmp_path, config)
    back = run_record.load_config(str(tmp_path))
    assert back.to_dict() == config.to_dict(), arg
    assert isinstance(back.mesh, tuple) and isinstance(back.mesh[0], tuple)


def test_the_record_holds_config_argv_commit_versions_and_shapes(tmp_path):
  config = helpers.tiny_clip_config("/data")
  example = {"image": np.zeros((2, 8, 8, 3), np.float32), "text": np.zeros((2, 5), np.int32),
             "_key": np.array(["a", "b"], dtype=object), "_num_bad": 0}
  record = _record(tmp_path, config, example)
  assert record["config"]["optim"]["lr"] == config.optim.lr
  assert record["config"]["mesh"] == [["data", 2], ["fsdp", 4], ["tensor", 1]]
  assert record["argv"] == sys.argv and record["changes"] == []
  assert record["input_shapes"] == {"image": {"shape": [2, 8, 8, 3], "dtype": "float32"},
                                    "text": {"shape": [2, 5], "dtype": "int32"}}
  assert set(record["versions"]) == {"python", "jax", "jaxlib", "flax", "optax",
                                     "orbax-checkpoint", "grain", "vlpre"}
  assert record["versions"]["jax"] and record["versions"]["grain"]
  commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  assert record["git_commit"] == (commit or None)  # these tests run from a checkout
  batch = run_record.input_batch(str(tmp_path))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "image": ((2, 8, 8, 3), np.float32), "text": ((2, 5), np.int32)}
  assert not batch["image"].any()


def test_outside_a_checkout_the_commit_is_null(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # no git on the machine
  assert run_record._git() == (None, None)  # pylint: disable=protected-access


def test_changed_fields_nested_lists_of_stages_and_nan():
  old = {"optim": {"lr": 1e-3, "b1": 0.9}, "seed": 0, "frozen": ["a"], "x": float("nan"),
         "stages": [{"steps": 3}, {"steps": 2}]}
  new = {"optim": {"lr": 1e-2, "b1": 0.9}, "seed": 0, "frozen": ["a", "b"], "x": float("nan"),
         "stages": [{"steps": 3}, {"steps": 5}], "added": 1}
  assert run_record.changed_fields(old, new) == {
      "optim.lr": (1e-3, 1e-2), "frozen": (["a"], ["a", "b"]), "stages.1.steps": (2, 5),
      "added": ("<absent>", 1)}


def test_what_a_resume_may_change():
  allowed = run_record.RESUMABLE
  for field in ("evals.zeroshot.every_steps", "log_every", "checkpoint.keep", "mesh",
                "input.data_dir", "stages.1.evals.probe.at_end"):
    assert run_record.is_allowed(field, allowed), field
  for field in ("optim.lr", "batch_size", "input.train", "seed", "losses.clip", "total_steps",
                "model.image.width", "input.num_workers", "stages.0.steps", "mesh_x"):
    assert not run_record.is_allowed(field, allowed), field
  assert run_record.is_allowed("optim.lr", ("optim",))
  assert run_record.is_allowed("anything.at.all", (run_record.ANY,))


def test_a_changed_run_is_refused_in_one_line_and_allowed_by_name(tmp_path):
  config = helpers.tiny_clip_config("/data", total_steps=6)
  _record(tmp_path, config)
  workdir = str(tmp_path)
  assert run_record.check_resume(config, workdir, None) == {}  # a fresh start: no check
  assert run_record.check_resume(config, workdir, 3) == {}

  changed = helpers.with_steps(config, 8)
  changed.optim.lr, changed.input.train = 1e-2, "other/*.tar"
  changed.log_every, changed.evals = 5, {}  # observation only: never refused
  with pytest.raises(run_record.ResumeRefused) as error:
    run_record.check_resume(changed, workdir, 3)
  message = str(error.value)
  assert "\n" not in message
  assert ("in total_steps (6 -> 8), optim.lr (0.0005 -> 0.01), input.train "
          '("flickr8k/train-*.tar" -> "other/*.tar");') in message
  assert "--allow_config_change=total_steps,optim.lr,input.train" in message
  assert "log_every" not in message and "evals" not in message

  accepted = run_record.check_resume(
      changed, workdir, 3, allow=("total_steps", "optim", "input.train"))
  assert accepted["optim.lr"] == (5e-4, 1e-2) and accepted["log_every"] == (1, 5)


def test_total_steps_below_the_checkpoint_is_refused_even_when_allowed(tmp_path):
  config = helpers.tiny_clip_config("/data", total_steps=6)
  _record(tmp_path, config)
  with pytest.raises(run_record.ResumeRefused, match=r"^total_steps 2 is below step 4 of the "
                                                     r"latest checkpoint in .*new workdir"):
    run_record.check_resume(helpers.with_steps(config, 2), str(tmp_path), 4,
                            allow=("total_steps",))
  # With no record (a run from before records) the steps are still checked.
  with pytest.raises(run_record.ResumeRefused, match="total_steps 2 is below step 4"):
    run_record.check_resume(helpers.with_steps(config, 2), str(tmp_path / "old"), 4)


def test_an_accepted_change_updates_the_record_and_is_logged_in_it(tmp_path):
  config = helpers.tiny_clip_config("/data", total_steps=6)
  first = _record(tmp_path, config)
  changed = helpers.with_steps(config, 9)
  changes = run_record.check_resume(changed, str(tmp_path), 6, allow=("total_steps",))
  run_record.write(changed, str(tmp_path), None, 6, changes)
  record = run_record.read(str(tmp_path))
  assert record["config"]["total_steps"] == 9 and record["argv"] == first["argv"]
  assert [(c["step"], c["fields"]) for c in record["changes"]] == [(6, {"total_steps": [6, 9]})]
  assert run_record.check_resume(changed, str(tmp_path), 6) == {}  # the new config is the record
  run_record.write(changed, str(tmp_path), None, 6, {})  # an unchanged resume writes nothing
  assert run_record.read(str(tmp_path)) == record


def test_tools_read_the_config_from_the_workdir_with_overrides(tmp_path):
  config = helpers.tiny_clip_config("/data")
  _record(tmp_path, config)
  argv = ["prog", f"--workdir={tmp_path}", "--config.optim.lr=0.25",
          "--config.evals.probe.num_classes=7"]
  values = flags.FlagValues()
  holder = run_record.define_config_flag(argv, flag_values=values)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  assert holder.value.optim.lr == 0.25 and holder.value.evals.probe.num_classes == 7
  assert holder.value.model.to_dict() == config.model.to_dict()

  config_file = os.path.join(ROOT, "configs", "clip.py")
  argv = ["prog", f"--workdir={tmp_path}", f"--config={config_file}:tiny"]
  values = flags.FlagValues()  # --config given: the file, as vlpre.main reads it
  holder = run_record.define_config_flag(argv, flag_values=values)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  assert holder.value.batch_size == config_lib.load(config_file + ":tiny").batch_size

  with pytest.raises(SystemExit, match=r"config.json not found .*give --config"):
    run_record.define_config_flag(["prog", f"--workdir={tmp_path / 'none'}"],
                                  flag_values=flags.FlagValues())


# End to end: the real train.run, vlpre.main, vlpre.evaluate and vlpre.export.


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A 2-step tiny CLIP whose training shard is deleted once it is trained:
  (config, workdir, its final metrics)."""
  root = tmp_path_factory.mktemp("recorded")
  train_data = root / "train_data"
  train_data.mkdir()
  helpers.small_shard(data_dir, train_data)
  config = helpers.tiny_clip_config(data_dir, total_steps=2)
  config.input.data_dir, config.input.train = str(train_data), "small-*.tar"
  config.evals = dict(retrieval=dict(config.evals.retrieval, max_examples=32))
  workdir = str(root / "run")
  final = train.run(config, workdir)
  shutil.rmtree(train_data)
  return config, workdir, final


@pytest.mark.integration
def test_evaluate_needs_no_training_data(trained):
  config, workdir, final = trained
  recorded = run_record.load_config(workdir)
  assert recorded.to_dict() == config_lib.with_workdir(config, workdir).to_dict()
  assert set(run_record.read(workdir)["input_shapes"]) == {"image", "text", "text_mask"}
  results = evaluate.evaluate(recorded, workdir)  # the training shard is gone
  assert results and all(k.startswith("retrieval/") for k in results)
  for name, value in results.items():
    np.testing.assert_allclose(value, final[name], atol=1e-6, err_msg=name)
  with pytest.raises(ValueError, match="--only: no evaluator zeroshot in the config; it has retrieval"):
    evaluate.evaluate(recorded, workdir, only=["zeroshot"])


def _python(*args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False,
                        cwd=ROOT, timeout=600)


@pytest.mark.integration
def test_evaluate_and_export_command_lines_take_just_the_workdir(trained, tmp_path):
  config, workdir, _ = trained
  result = _python("-m", "vlpre.evaluate", f"--workdir={workdir}",
                   "--config.evals.retrieval.max_examples=16")
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout[result.stdout.index("{"):])
  overridden = helpers.with_steps(config, 2)
  overridden.evals.retrieval.max_examples = 16
  expected = evaluate.evaluate(overridden, workdir)
  assert set(printed) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(printed[name], value, atol=1e-6, err_msg=name)

  out = tmp_path / "export"
  result = _python("-m", "vlpre.export", f"--workdir={workdir}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "config.json", encoding="utf-8") as f:
    exported = json.load(f)
  assert exported["architectures"] == ["Dinov2Model"]
  assert exported["hidden_size"] == config.model.image.width
  assert (out / "head.safetensors").is_file()

  result = _python("-m", "vlpre.export", f"--workdir={tmp_path / 'none'}", f"--out={out}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].endswith(
      "(a run records its config at its first start): give --config, as the run was started with")


def _checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def drift_config(data_dir):
  config = helpers.tiny_clip_config(data_dir, total_steps=2)
  config.evals = {}
  return config


@pytest.mark.integration
def test_a_drifted_resume_stops_before_training_and_an_allowed_one_goes_on(data_dir, tmp_path):
  config, workdir = drift_config(data_dir), str(tmp_path / "run")
  train.run(config, workdir)
  record = run_record.read(workdir)

  # vlpre.main: one line, exit 1, nothing touched.
  config_file = tmp_path / "drift_config.py"
  config_file.write_text("from tests import test_run_record\n\n\ndef get_config(arg=None):\n"
                         f"  return test_run_record.drift_config({data_dir!r})\n")
  result = _python("-m", "vlpre.main", f"--config={config_file}", f"--workdir={workdir}",
                   "--config.optim.lr=0.01", "--config.log_every=5")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"vlpre: the config differs from the one this run recorded in {workdir}/config.json in optim.lr "
      "(0.0005 -> 0.01); resuming with it would silently change the run. Rerun with "
      "--allow_config_change=optim.lr (train.run's allow_config_change) to accept the change, "
      "or use a new workdir")
  assert _checkpoint_steps(workdir)[-1] == 2 and run_record.read(workdir) == record
  assert max(r["step"] for r in metrics.read_metrics(workdir)) == 2

  # Accepted by name: the run goes on under the new config, and the record says so.
  longer = helpers.with_steps(config, 3)
  longer.optim.lr = 1e-2
  train.run(longer, workdir, allow_config_change=("total_steps", "optim.lr"))
  assert _checkpoint_steps(workdir)[-1] == 3
  record = run_record.read(workdir)
  assert record["config"]["optim"]["lr"] == 1e-2
  assert [(c["step"], c["fields"]) for c in record["changes"]] == [
      (2, {"total_steps": [2, 3], "optim.lr": [5e-4, 1e-2]})]
  rows = {r["step"]: r for r in metrics.read_metrics(workdir)}
  assert rows[3]["learning_rate"] != 0 and rows[3]["learning_rate"] <= 1e-2

  # Fewer steps than the checkpoint: never a silent exit 0, even when allowed.
  with pytest.raises(run_record.ResumeRefused, match="total_steps 2 is below step 3"):
    train.run(helpers.with_steps(longer, 2), workdir, allow_config_change=("total_steps",))
  # Only watched fields changed (evaluators, logging, checkpoints, mesh): no question asked.
  watched = helpers.with_steps(longer, 3)
  watched.log_every, watched.checkpoint.keep = 7, 1
  watched.mesh = (("data", 4), ("fsdp", 2), ("tensor", 1))
  train.run(watched, workdir)
  assert run_record.read(workdir)["changes"][-1]["fields"]["log_every"] == [1, 7]


@pytest.mark.integration
def test_a_shortened_stage_is_refused_and_not_marked_finished(data_dir, tmp_path, monkeypatch):
  config = drift_config(data_dir)
  config.stages = (dict(name="a", steps=3), dict(name="b", steps=1))
  workdir = str(tmp_path / "staged")
  real_run = train.run

  def stop_at_step_2(cfg, directory, **kwargs):
    kwargs["on_step"] = lambda step: step == 2 and train.request_stop()
    return real_run(cfg, directory, **kwargs)

  monkeypatch.setattr(train, "run", stop_at_step_2)
  stages.run(config, workdir)
  monkeypatch.undo()
  stage_a = os.path.join(workdir, "0_a")
  assert train.stop_requested() and _checkpoint_steps(stage_a)[-1] == 2
  assert run_record.read(workdir)["config"]["stages"][0]["steps"] == 3
  assert run_record.read(stage_a)["config"]["total_steps"] == 3

  shorter = drift_config(data_dir)
  shorter.stages = (dict(name="a", steps=1), dict(name="b", steps=1))
  with pytest.raises(run_record.ResumeRefused, match=r"in stages\.0\.steps \(3 -> 1\)"):
    stages.run(shorter, workdir)
  with pytest.raises(run_record.ResumeRefused, match="total_steps 1 is below step 2"):
    stages.run(shorter, workdir, allow_config_change=("stages.0.steps",))
  assert not os.path.exists(os.path.join(stage_a, "final_params"))  # not finished
  assert sorted(os.listdir(workdir)) == ["0_a", "config.json"]
