"""Run outputs in a bucket: a train → SIGTERM → resume cycle with a `gs://` workdir.

No GCS server is reachable from a test, so the bucket is a fake one laid over a temporary
directory: epath (which vlpre and orbax write metadata, metrics, TensorBoard events and
the input state through) by `epath.testing.mock_epath`, TensorStore (which orbax writes
array data through) by pointing orbax's GCS kvstore spec at the same directory. vlpre's
code sees `gs://` URIs throughout; the test checks that nothing lands in the working
directory (where `os.path.abspath("gs://...")` would have put it) and that the resumed
losses equal an uninterrupted local run's.
"""
import os
import signal

from etils import epath
import pytest

from vlpre import metrics, storage, train

from tests import helpers


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://<bucket>/<path> is tmp_path/bucket/<bucket>/<path>; returns that local root."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  root = tmp_path / "bucket"
  root.mkdir()

  def local(p):
    p = os.fspath(p)
    return os.fspath(root / p[len("gs://"):]) if p.startswith("gs://") else p

  def remote(p):
    p = os.fspath(p)
    return "gs://" + os.path.relpath(p, root) if p.startswith(os.fspath(root) + "/") else p

  def on_path(fn, p, *args, **kwargs):
    return fn(local(p), *args, **kwargs)

  def on_two_paths(fn, p, dst, *args, **kwargs):
    return fn(local(p), local(dst), *args, **kwargs)

  def glob(fn, p):
    return [remote(x) for x in fn(local(p))]

  def walk(fn, top, **kwargs):
    for d, dirs, files in fn(local(top), **kwargs):
      yield remote(d), dirs, files

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda p: {"driver": "file", "path": local(p)})
  # Asked of a GCS client; a flat namespace is what orbax assumes without one.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
  with epath.testing.mock_epath(
      open=on_path, exists=on_path, isdir=on_path, listdir=on_path, makedirs=on_path,
      mkdir=on_path, remove=on_path, rmtree=on_path, stat=on_path, rename=on_two_paths,
      replace=on_two_paths, copy=on_two_paths, glob=glob, walk=walk):
    yield root


def test_uris_stay_uris_and_other_schemes_are_one_line_errors(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(storage.path("gs://b/run")) == "gs://b/run"
  assert str(storage.path("run")) == os.path.join(str(tmp_path), "run")
  with pytest.raises(ValueError, match=r"workdir 's3://b/run': vlpre writes to local paths and "
                                       r"gs:// URIs, not s3://$"):
    storage.path("s3://b/run", what="workdir")
  with pytest.raises(ValueError, match="workdir 'memory://run'"):
    train.run(helpers.tiny_clip_config("unused"), "memory://run")


@pytest.mark.integration
def test_train_and_resume_in_a_bucket(tmp_path, data_dir, fake_gcs, monkeypatch):
  config = helpers.tiny_clip_config(data_dir, total_steps=4)
  config.evals = {}
  config.checkpoint.every_steps = 2
  config.checkpoint.keep = 1  # step 2 is deleted once step 4 is written
  train.run(config, str(tmp_path / "straight"))

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  workdir = "gs://vlpre-test/runs/clip"

  def preempt(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  train.run(config, workdir, on_step=preempt)
  bucket_run = fake_gcs / "vlpre-test" / "runs" / "clip"
  assert sorted(p.name for p in (bucket_run / "checkpoints").iterdir()) == ["2"]
  assert max(r["step"] for r in metrics.read_metrics(workdir)) == 2
  train.run(config, workdir)

  assert not list(cwd.iterdir()), list(cwd.rglob("*"))  # nothing at ./gs:/...
  assert sorted(p.name for p in (bucket_run / "checkpoints").iterdir()) == ["4"]
  assert (bucket_run / "checkpoints" / "4" / "data").is_dir()  # the input position
  events = list((bucket_run / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 2 and all(e.stat().st_size > 0 for e in events)
  straight = {r["step"]: r["loss"] for r in metrics.read_metrics(str(tmp_path / "straight"))}
  resumed = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}
  assert sorted(resumed) == [1, 2, 3, 4]
  assert resumed == straight  # bit for bit: same batches, rngs and optimizer state
  assert (bucket_run / "metrics.jsonl").read_text().count("\n") == 4  # no row lost or repeated
