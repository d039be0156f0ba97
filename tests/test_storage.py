"""Run outputs and training data in a bucket: a train → SIGTERM → resume cycle with a
`gs://` workdir reading `gs://` shards, and the shard indexes persisted beside them.

No GCS server is reachable from a test, so the bucket is a fake one laid over a temporary
directory: epath (which vlpre and orbax write metadata, metrics, TensorBoard events and
the input state through) by `epath.testing.mock_epath`, TensorStore (which orbax writes
array data through) by pointing orbax's GCS kvstore spec at the same directory. vlpre's
code sees `gs://` URIs throughout; the test checks that nothing lands in the working
directory (where `os.path.abspath("gs://...")` would have put it) and that the resumed
losses equal an uninterrupted local run's. The bucket's shards are links to the shared
data (never copies), in a folder of the bucket's own, where their indexes are written.
"""
import json
import copy
import io
import os
import signal
import tarfile

from etils import epath
import numpy as np
import pytest

from vlpre import metrics, storage, train, workdir_lock
from vlpre.data import sources, tar_index, tar_scan

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


@pytest.fixture
def bucket_data(fake_gcs, data_dir):
  """gs://data/flickr8k/train-0000{0,1}.tar: links to the shared shards; returns the folder."""
  folder = fake_gcs / "data" / "flickr8k"
  folder.mkdir(parents=True)
  for name in ("train-00000.tar", "train-00001.tar"):
    (folder / name).symlink_to(os.path.join(data_dir, "flickr8k", name))
  return folder


@pytest.fixture
def count_scans(monkeypatch):
  """Starts from an empty in-process index cache; returns the shards scanned since."""
  monkeypatch.setattr(tar_index, "_INDEX_CACHE", {})
  scanned = []
  real_scan = tar_scan.scan

  def counting(path):
    scanned.append(path)
    return real_scan(path)

  monkeypatch.setattr(tar_scan, "scan", counting)
  return scanned


def _same_index(a, b):
  assert len(a) == len(b) and a.exts == b.exts and a.bad_reasons == b.bad_reasons
  for field in ("keys", "sample_shard", "sample_start", "member_ext", "member_offset",
                "member_size"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_bucket_shards_read_as_local_ones_and_index_once(bucket_data, data_dir, count_scans,
                                                         monkeypatch):
  local = sources.TarShardSource("flickr8k/train-0000[01].tar", data_dir=data_dir)
  count_scans.clear()
  bucket = sources.TarShardSource("flickr8k/train-*.tar", data_dir="gs://data")
  assert bucket.shards == ("gs://data/flickr8k/train-00000.tar", "gs://data/flickr8k/train-00001.tar")
  assert sorted(count_scans) == list(bucket.shards)  # each once, in a random order
  _same_index(local._index, bucket._index)  # pylint: disable=protected-access
  for i in range(0, len(local), 97):
    assert bucket[i] == local[i]
  assert sorted(p.name for p in (bucket_data / tar_index.INDEX_FOLDER).iterdir()) == [
      "train-00000.tar.json", "train-00001.tar.json"]

  # Another process (an empty in-memory cache) reads the persisted indexes: no scan.
  monkeypatch.setattr(tar_index, "_INDEX_CACHE", {})
  count_scans.clear()
  again = sources.TarShardSource("gs://data/flickr8k/train-*.tar")
  assert count_scans == []
  _same_index(local._index, again._index)  # pylint: disable=protected-access
  assert again[len(again) - 1] == local[len(local) - 1]


def _write_tar(path, members):
  with tarfile.open(path, "w") as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))


def test_a_changed_shard_is_rescanned_and_local_shards_persist_only_where_asked(
    fake_gcs, tmp_path, count_scans, monkeypatch):
  folder = fake_gcs / "data" / "small"
  folder.mkdir(parents=True)
  shard = folder / "s-0.tar"
  _write_tar(shard, [("a.txt", b"one"), ("b.txt", b"two")])
  assert [r["txt"] for r in sources.TarShardSource("gs://data/small/*.tar")] == [b"one", b"two"]
  _write_tar(shard, [("a.txt", b"one"), ("b.txt", b"two"), ("c.txt", b"three")])
  os.utime(shard, ns=(1, 10**18))  # another size and time: the persisted scan is stale
  monkeypatch.setattr(tar_index, "_INDEX_CACHE", {})
  count_scans.clear()
  source = sources.TarShardSource("gs://data/small/*.tar")
  assert count_scans == ["gs://data/small/s-0.tar"] and len(source) == 3
  assert source[2] == {"__key__": "c", "txt": b"three"}

  # Local shards: nothing written beside them; with index_dir, persisted there and reused.
  local = tmp_path / "local"
  local.mkdir()
  _write_tar(local / "t-0.tar", [("x.txt", b"x")])
  sources.TarShardSource(str(local / "*.tar"))
  assert sorted(p.name for p in local.iterdir()) == ["t-0.tar"]
  monkeypatch.setattr(tar_index, "_INDEX_CACHE", {})
  sources.TarShardSource(str(local / "*.tar"), index_dir="gs://run/shard_index")
  count_scans.clear()
  monkeypatch.setattr(tar_index, "_INDEX_CACHE", {})
  assert sources.TarShardSource(str(local / "*.tar"), index_dir="gs://run/shard_index")[0] == {
      "__key__": "x", "txt": b"x"}
  assert count_scans == [] and len(list((fake_gcs / "run" / "shard_index").iterdir())) == 1


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
def test_train_and_resume_in_a_bucket(tmp_path, data_dir, fake_gcs, bucket_data, monkeypatch):
  config = helpers.tiny_clip_config(data_dir, total_steps=4)
  config.evals = {}
  config.checkpoint.every_steps = 2
  config.checkpoint.keep = 1  # step 2 is deleted once step 4 is written
  config.input.train = "flickr8k/train-0000[01].tar"  # the shards the bucket holds
  train.run(config, str(tmp_path / "straight"))

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  workdir = "gs://vlpre-test/runs/clip"
  config = copy.deepcopy(config)  # the same shards, read from the bucket
  config.input.data_dir = "gs://data"

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
  assert (bucket_data / tar_index.INDEX_FOLDER / "train-00000.tar.json").is_file()
  assert (bucket_run / "metrics.jsonl").read_text().count("\n") == 4  # no row lost or repeated


def test_the_workdir_lock_in_a_bucket(fake_gcs):
  """Written, read back, refused to a second trainer and removed on release, all through epath."""
  first = workdir_lock.WorkdirLock("gs://vlpre-test/runs/locked", settle_s=0)
  first.workdir.mkdir(parents=True)
  first.acquire()
  lock_file = fake_gcs / "vlpre-test" / "runs" / "locked" / workdir_lock.LOCK_NAME
  assert json.loads(lock_file.read_text())["token"] == first.record["token"]
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
    workdir_lock.WorkdirLock("gs://vlpre-test/runs/locked", settle_s=0).acquire()
  first.release()
  assert not lock_file.exists()
  # A lock whose writer lost the race: the record read back is another trainer's.
  second = workdir_lock.WorkdirLock("gs://vlpre-test/runs/locked", settle_s=0)
  real_create = second._create  # pylint: disable=protected-access

  def create_then_overwritten():
    real_create()
    lock_file.write_text(json.dumps({**second.record, "token": "theirs", "pid": 1}))
    return True

  second._create = create_then_overwritten  # pylint: disable=protected-access
  with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1,"):
    second.acquire()
