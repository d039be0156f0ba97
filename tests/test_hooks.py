"""The trainer's optional hooks: jax.profiler traces of chosen steps (config.profile_steps)
and the Weights & Biases sink (config.wandb), off by default."""
import glob
import gzip
import importlib.util
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from vlpre import check
from vlpre import config_lib
from vlpre import metrics
from vlpre import profiling
from vlpre import train

from tests import helpers


def _traces(workdir):
  return sorted(glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*",
                                       "*.xplane.pb")))


def test_profile_steps_trace_only_the_window_where_tensorboard_reads(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  profiler = profiling.StepProfiler((2, 3), str(tmp_path))
  x = jnp.ones((32, 32))
  for step in range(1, 5):
    profiler.before(step)
    out = f(x + step)
    profiler.after(step, out)
    if step == 1:
      assert not os.path.exists(tmp_path / "tensorboard")  # nothing before the window
  profiler.close()  # a no-op once the window is over
  traces = _traces(tmp_path)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  # TensorBoard's Profile tab reads <logdir>/plugins/profile/<run>/<host>.xplane.pb; the
  # Perfetto trace beside it holds the two annotated steps.
  with gzip.open(traces[0].replace(".xplane.pb", ".trace.json.gz")) as fh:
    events = json.load(fh)["traceEvents"]
  steps = {str(e.get("args", {}).get("step_num")) for e in events if e.get("name") == "train"}
  assert steps == {"2", "3"}


def test_profile_steps_values():
  assert profiling.steps_problem(()) is None and profiling.steps_problem((5, 5)) is None
  assert "1 <= first <= last" in profiling.steps_problem((4, 2))
  assert "(first, last)" in profiling.steps_problem((3,))
  with pytest.raises(ValueError, match="profile_steps: must satisfy"):
    profiling.StepProfiler((0, 2), "/nonexistent")


class _FakeWandb(types.ModuleType):
  """Stands in for the wandb package: records init's arguments, logged rows, finish."""

  def __init__(self, fail=False):
    super().__init__("wandb")
    self.inits, self.rows, self.finished, self.fail = [], [], 0, fail

  def init(self, **kwargs):
    if self.fail:
      raise RuntimeError("api.wandb.ai unreachable\nsecond line")
    self.inits.append(kwargs)
    fake = self

    class Run:
      def log(self, row, step):
        fake.rows.append((step, row))

      def finish(self):
        fake.finished += 1

    return Run()


class _Untouchable(types.ModuleType):
  def __getattr__(self, name):
    raise AssertionError(f"wandb.{name} used while wandb is disabled")


def test_wandb_is_off_by_default_and_never_imported(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", _Untouchable("wandb"))
  for cfg in (None, config_lib.base("tiny").wandb):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False, wandb=cfg)
    writer.write(1, {"loss": 1.0})
    writer.close()
  assert config_lib.base(None).wandb.enabled is False
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1]


def test_wandb_sink_offline_by_default_same_run_on_resume(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = dict(config_lib.base("tiny").wandb, enabled=True)
  config = config_lib.base("tiny")
  for step in (1, 2):  # a run, then its resumption in the same workdir
    writer = metrics.MetricWriter(str(tmp_path / "run"), tensorboard=False, wandb=cfg,
                                  run_config=config)
    writer.write(step, {"loss": 2.0 / step})
    writer.close()
  first, second = fake.inits
  assert first["mode"] == "offline" and first["dir"] == str(tmp_path / "run")
  assert first["id"] == second["id"] and first["resume"] == "allow"
  assert first["name"] == "run" and first["project"] == "vlpre" and first["entity"] is None
  assert first["config"]["batch_size"] == config.batch_size  # the run's config, as a dict
  assert fake.rows == [(1, {"loss": 2.0}), (2, {"loss": 1.0})] and fake.finished == 2
  other = metrics.MetricWriter(str(tmp_path / "other"), tensorboard=False, wandb=cfg)
  other.close()
  assert fake.inits[-1]["id"] != first["id"]
  # Not the main process: no wandb run at all.
  metrics.MetricWriter(str(tmp_path / "run"), tensorboard=False, wandb=cfg,
                       is_main_process=False).close()
  assert len(fake.inits) == 3


def test_wandb_that_cannot_start_leaves_the_run_going(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(fail=True))
  caplog.set_level("WARNING")
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False,
                                wandb=dict(enabled=True, mode="online"))
  writer.write(3, {"loss": 0.5})
  writer.close()
  assert metrics.read_metrics(str(tmp_path)) == [{"step": 3, "loss": 0.5}]
  assert "wandb could not start (RuntimeError: api.wandb.ai unreachable)" in caplog.text


def test_check_reports_the_hooks_in_one_line_each(monkeypatch):
  c = helpers.tiny_clip_config(None)
  c.evals = {}
  c.input.train = os.path.abspath(__file__)  # any file: only the hook lines matter here
  c.profile_steps = (3, 1)
  c.wandb.enabled = True
  c.wandb.mode = "cloud"
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
  problems = [p for p in check.check_config(c) if not p.startswith("input.")]
  assert problems == [
      "profile_steps: must satisfy 1 <= first <= last, got (3, 1)",
      'wandb.enabled: wandb is not installed: pip install -e ".[wandb]"',
      "wandb.mode: 'cloud'; use offline, online or disabled"]


@pytest.mark.integration
def test_train_run_profiles_its_steps_and_logs_to_wandb(tmp_path, data_dir, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = helpers.tiny_clip_config(data_dir, total_steps=3)
  config.evals = {}
  config.profile_steps = (2, 3)
  config.wandb.enabled = True
  train.run(config, str(tmp_path))
  assert len(_traces(str(tmp_path))) == 1
  assert [step for step, row in fake.rows] == [1, 2, 3] and "loss" in fake.rows[0][1]
  assert fake.finished == 1
