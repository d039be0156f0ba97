"""End-to-end: the real `train.run` on real Flickr8k shards under a data=2, fsdp=4 mesh."""
import importlib
import io
import logging as std_logging
import math
import os
import signal
import sys

import jax
import numpy as np
import pytest

from vlpre import data, evaluate, init_params, methods, metrics, train, train_state

from tests import helpers


@pytest.mark.integration
def test_interrupted_run_resumes_and_matches_uninterrupted(tmp_path, data_dir):
  config = helpers.tiny_clip_config(data_dir, total_steps=6)
  straight = tmp_path / "straight"
  final = train.run(config, str(straight))
  assert math.isfinite(final["loss"])
  assert final["retrieval/i2t_R@1"] >= 0.0 and "zeroshot/top1" in final

  resumed = tmp_path / "resumed"

  def preempt(step):
    if step == 3:  # the real handler: SIGTERM → checkpoint → return
      os.kill(os.getpid(), signal.SIGTERM)

  caller_handler = signal.getsignal(signal.SIGTERM)
  train.run(config, str(resumed), on_step=preempt)
  assert train.stop_requested() and sorted(os.listdir(resumed / "checkpoints"))[-1] == "3"
  # The caller's SIGTERM handler is back: a later SIGTERM ends the process as it would have.
  assert signal.getsignal(signal.SIGTERM) is caller_handler
  assert max(r["step"] for r in metrics.read_metrics(str(resumed))) == 3
  train.run(config, str(resumed))

  a = {r["step"]: r["loss"] for r in metrics.read_metrics(str(straight))}
  b = {r["step"]: r["loss"] for r in metrics.read_metrics(str(resumed))}
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in a:  # bit-exact on CPU: same batches, same rngs, same optimizer state
    assert a[step] == b[step], (step, a[step], b[step])
  assert len(set(a.values())) > 1

  # Standalone evaluation of the final checkpoint reproduces the in-training evals, and
  # writes its rows to a file of its own (a trainer may be writing metrics.jsonl).
  trainer_rows = (straight / "metrics.jsonl").read_bytes()
  standalone = evaluate.evaluate(config, str(straight))
  for name in ("retrieval/i2t_R@1", "retrieval/t2i_R@5", "zeroshot/top1", "probe/top1"):
    np.testing.assert_allclose(standalone[name], final[name], atol=1e-6)
  assert (straight / "metrics.jsonl").read_bytes() == trainer_rows
  assert metrics.read_lines(str(straight), (metrics.EVAL_METRICS_FILE,)) == [
      {"step": 6, **standalone}]


@pytest.mark.integration
def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path, data_dir):
  config = helpers.tiny_clip_config(data_dir, total_steps=6)
  config.checkpoint.every_steps = 1
  config.evals = {}
  workdir = str(tmp_path / "nan")
  train.run(helpers.with_steps(config, 2), workdir)  # two good steps, checkpointed

  config.optim.lr = float("nan")  # every update from here on poisons the params
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    train.run(config, workdir, allow_config_change=("total_steps", "optim.lr"))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps[-1] == 2  # step 3's update made the params NaN: that state was never saved
  rows = metrics.read_metrics(workdir)
  assert all(math.isfinite(r["loss"]) for r in rows)


@pytest.mark.integration
def test_an_infinite_loss_stops_like_a_nan_one(tmp_path, data_dir):
  """Inf, not only NaN: a loss weighted by inf stops the run at step 1, nothing saved or logged."""
  config = helpers.tiny_clip_config(data_dir, total_steps=3)
  config.evals = {}
  config.losses = {"clip": float("inf")}
  workdir = str(tmp_path / "inf")
  with pytest.raises(FloatingPointError, match=r"^loss is inf at step 1; stopping\. No checkpoint "
                                               r"was written to "):
    train.run(config, workdir)
  assert not [s for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert not [r for r in metrics.read_metrics(workdir) if "loss" in r]


def test_batch_must_divide_the_data_parallel_devices(tmp_path, data_dir):
  config = helpers.tiny_clip_config(data_dir, total_steps=1)
  config.batch_size = 12
  with pytest.raises(ValueError, match="not divisible by the 8 data-parallel"):
    train.run(config, str(tmp_path))


class _HookSeen(Exception):
  pass


@pytest.mark.parametrize("hook", ["stream", "records"])
@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_the_methods_input_hooks_reach_the_pipeline(entry, hook, tmp_path, data_dir, monkeypatch):
  """InputExtras.stream and .records are handed to build_train_dataset by both entry points."""
  def stream(ds):
    raise _HookSeen(type(ds).__name__)

  def records(cfg, **host):
    raise _HookSeen(", ".join(sorted(host)))

  extras = methods.InputExtras(stream=stream) if hook == "stream" else methods.InputExtras(
      records=records)
  monkeypatch.setattr(methods, "input_extras", lambda config: extras)
  config = helpers.tiny_clip_config(data_dir, total_steps=1)
  # The stream comes after bad records are dropped; records get this host's share.
  match = "SkipBad" if hook == "stream" else "host_batch, process_count, process_index, seed"
  with pytest.raises(_HookSeen, match=match):
    if entry == "train":
      train.run(config, str(tmp_path))
    else:
      evaluate.evaluate(config, str(tmp_path))


def test_bad_sample_guard():
  guard = data.BadSampleGuard(0.1, min_samples=100)
  guard.update(5, 95)
  with pytest.raises(RuntimeError, match="max_bad_fraction"):
    guard.update(10, 0)


@pytest.mark.integration
def test_lit_locks_the_image_tower_loaded_from_another_run(tmp_path, data_dir):
  """LiT: image tower initialised from a CLIP workdir and frozen by regex; text side trains."""
  clip = helpers.tiny_clip_config(data_dir, total_steps=2)
  clip.evals = {}
  train.run(clip, str(tmp_path / "clip"))
  source = checkpoint_params(str(tmp_path / "clip"))

  lit = helpers.with_steps(clip, 2)
  lit.init_from = dict(workdir=str(tmp_path / "clip"), prefixes=("img", "img_head"))
  lit.frozen = ("img/.*", "img_head/.*")
  train.run(lit, str(tmp_path / "lit"))
  s = train_state.setup(lit, next(iter(_dataset(lit))))
  assert "img" in s.frozen and "img" not in s.state.params  # never in the optimizer state
  after = checkpoint_params(str(tmp_path / "lit"))
  assert "img" not in after  # the checkpointed trainable params hold only the text side
  for a, b in zip(jax.tree.leaves(s.frozen["img"]), jax.tree.leaves(source["img"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  changed = [not np.array_equal(np.asarray(a), np.asarray(b))  # trained vs freshly initialised
             for a, b in zip(jax.tree.leaves(after["txt"]), jax.tree.leaves(s.state.params["txt"]))]
  assert any(changed)

  # Set up to restore (vlpre.evaluate, a resume): the state stays abstract, nothing is
  # initialised at random, while the frozen tower is loaded as for training.
  batch = next(iter(_dataset(lit)))
  restoring = train_state.setup(lit, batch, restoring=True)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(restoring.state))
  assert jax.tree.map(lambda x: (x.shape, x.sharding), restoring.state) == jax.tree.map(
      lambda x: (x.shape, x.sharding), s.state)
  for a, b in zip(jax.tree.leaves(restoring.frozen), jax.tree.leaves(s.frozen)):
    assert isinstance(a, jax.Array) and a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # a frozen weight that only the random init gives: everything is built as for training
  random_frozen = helpers.with_steps(clip, 2)
  random_frozen.frozen = ("img_head/.*",)
  fallback = train_state.setup(random_frozen, batch, restoring=True)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves((fallback.state, fallback.frozen)))


def checkpoint_params(workdir):
  import orbax.checkpoint as ocp
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory, item_handlers={"state": ocp.StandardCheckpointHandler()}) as m:
    state = m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return state["state"]["params"]


def _dataset(config):
  return data.build_train_dataset(config.input, global_batch_size=config.batch_size,
                                  seed=config.seed, tokenizer=methods.build_tokenizer(config))


def test_place_pretrained_accepts_a_partial_tree_only_where_allowed():
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {"llm": {"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)},
            "head": np.zeros(1, np.float32)}
  shardings = jax.tree.map(lambda _: dev, params)
  partial = {"llm": {"a": np.ones(2)}}
  with pytest.raises(ValueError, match="lacks 1 weights"):
    init_params.place_pretrained(params, partial, shardings)
  out = init_params.place_pretrained(params, partial, shardings, partial_ok=("llm",))
  np.testing.assert_array_equal(out["llm"]["a"], np.ones(2))
  np.testing.assert_array_equal(out["llm"]["b"], np.zeros(3))  # kept as already placed
  with pytest.raises(ValueError, match="no place"):
    init_params.place_pretrained(params, {"llm": {"c": np.ones(1)}}, shardings, partial_ok=("llm",))
  with pytest.raises(ValueError, match="shape"):
    init_params.place_pretrained(params, {"llm": {"a": np.ones(5)}}, shardings, partial_ok=("llm",))


def test_quiet_console_decides_by_module_not_by_path(tmp_path, monkeypatch, caplog):
  """A checkout named `vlpre` with its venv inside: every library's files lie under a
  folder named vlpre, and their INFO lines must still be dropped."""
  site = tmp_path / "vlpre" / ".venv" / "lib" / "python3.11" / "site-packages"
  (site / "fakeorbax").mkdir(parents=True)
  (site / "fakeorbax" / "__init__.py").write_text(
      "from absl import logging\n"
      "def save(tag):\n"
      "  logging.info('fakeorbax-info-%s', tag)\n"
      "  logging.warning('fakeorbax-warning-%s', tag)\n")
  monkeypatch.syspath_prepend(str(site))
  monkeypatch.delitem(sys.modules, "fakeorbax", raising=False)
  fakeorbax = importlib.import_module("fakeorbax")
  assert "/vlpre/" in fakeorbax.__file__.replace(os.sep, "/")  # what fooled a path filter
  caplog.set_level("INFO")
  absl_logging = importlib.import_module("absl.logging")
  try:
    metrics.quiet_console()
    fakeorbax.save("quiet")
    metrics.Progress(10, 4, bar=False).report(1, 2.5)  # vlpre's own INFO line
    metrics.quiet_console(verbose=True)
    fakeorbax.save("verbose")
  finally:
    metrics.quiet_console(verbose=True)
  err = " ".join(caplog.messages)
  assert "fakeorbax-warning-quiet" in err and "step 1/10 | loss 2.5000" in err
  assert "fakeorbax-info-verbose" in err
  assert "fakeorbax-info-quiet" not in err
  # Libraries' own loggers (jax's, e.g.) reach absl's handler through the root logger:
  # their INFO lines are dropped there, by logger name; vlpre's own loggers' pass.
  handler = absl_logging.get_absl_handler()
  stream = io.StringIO()  # absl writes to its stream, or to sys.stderr before flag parsing
  old_stream = handler.python_handler.setStream(stream)
  monkeypatch.setattr(sys, "stderr", stream)
  added = handler not in std_logging.root.handlers
  if added:
    std_logging.root.addHandler(handler)
  try:
    metrics.quiet_console()
    std_logging.getLogger("fakejax._src.xla_bridge").info("fakejax-info")
    std_logging.getLogger("fakejax._src.xla_bridge").warning("fakejax-warning")
    std_logging.getLogger("vlpre.somewhere").info("vlpre-logger-info")
  finally:
    metrics.quiet_console(verbose=True)
    handler.python_handler.setStream(old_stream)
    if added:
      std_logging.root.removeHandler(handler)
  out = stream.getvalue()
  assert "fakejax-warning" in out and "vlpre-logger-info" in out
  assert "fakejax-info" not in out
  assert metrics.format_results({"a/top1": 0.5, "b": 2.0}) == "a/top1 0.5 | b 2"


def test_quiet_console_drops_a_librarys_traceback_not_its_line(caplog):
  """orbax logs a failed write with its traceback; vlpre's one line reports the failure."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  code = compile("try:\n  1 / 0\nexcept ZeroDivisionError:\n  logging.exception('write failed')",
                 "/site-packages/orbax/checkpoint/async_checkpointer.py", "exec")
  caplog.set_level("INFO")
  try:
    metrics.quiet_console()
    exec(code, {"logging": absl_logging})
    metrics.quiet_console(verbose=True)
    exec(code, {"logging": absl_logging})
  finally:
    metrics.quiet_console(verbose=True)
  quiet, verbose = caplog.records
  assert quiet.getMessage() == verbose.getMessage() == "write failed"
  assert quiet.exc_info is None and verbose.exc_info is not None
