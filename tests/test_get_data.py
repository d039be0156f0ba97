"""`make data` (notebooks/get_data.py) from local copies of its source repositories
(file:// URLs, as these machines have no network), built from real photos and captions
of the shared data: the shards it writes, its checksums, and a rerun that keeps or
rebuilds a set."""
import io
import json
import os
import subprocess
import sys
import tarfile

from PIL import Image
import pytest

from vlpre.data import tar_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "notebooks", "get_data.py")
pytestmark = pytest.mark.integration  # subprocesses and git


def _members(path: str, count: int) -> list[tuple[str, dict[str, bytes]]]:
  """The first `count` samples of a shard: (key, {extension: bytes})."""
  samples: dict[str, dict[str, bytes]] = {}
  with tarfile.open(path) as tar:
    for member in tar:
      key, ext = member.name.split(".", 1)
      if key not in samples and len(samples) == count:
        break
      samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
  return list(samples.items())


def _git_repo(folder, files: dict[str, bytes]) -> tuple[str, str]:
  """A one-commit repository holding `files`; its (file:// URL, commit)."""
  for name, data in files.items():
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", str(folder)], check=True)
  subprocess.run([*git, "add", "-A"], check=True)
  subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
  commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
  return f"file://{folder}", commit


def _sources(data_dir, tmp_path) -> str:
  # ImageNet sample: three real photos, under the names the source repository uses,
  # listed out of class order.
  photos = _members(os.path.join(data_dir, "imagenet_sample", "imagenet_sample-00000.tar"), 3)
  imagenet = {f"{key}.JPEG": parts["jpg"] for key, parts in reversed(photos)}
  imagenet["README.md"] = b"sample images\n"
  # Flickr8k: four real photos and their captions; three for train, one for val.
  pairs = _members(os.path.join(data_dir, "flickr8k", "val-00000.tar"), 4)
  names = [json.loads(parts["json"])["filename"] for _, parts in pairs]
  images = {f"data/images/{name}": parts["jpg"] for name, (_, parts) in zip(names, pairs)}
  images["data/flickr8k.TrainImages.txt"] = "\n".join(names[:3]).encode() + b"\n"
  images["data/flickr8k.DevImages.txt"] = names[3].encode() + b"\n"
  lines = [f"{name}#{i}\t{caption}" for name, (_, parts) in zip(names, pairs)
           for i, caption in enumerate(json.loads(parts["json"])["captions"])]
  captions = {"data/ignore_captions.txt": "\n".join(lines).encode() + b"\n"}
  sources = {"imagenet_sample": _git_repo(tmp_path / "mirror" / "imagenet", imagenet),
             "flickr8k_images": _git_repo(tmp_path / "mirror" / "images", images),
             "flickr8k_captions": _git_repo(tmp_path / "mirror" / "captions", captions)}
  path = tmp_path / "sources.json"
  path.write_text(json.dumps(sources))
  return str(path)


def _get_data(out, sources):
  result = subprocess.run(
      [sys.executable, SCRIPT, f"--out={out}", "--sets=flickr8k,imagenet_sample",
       f"--sources={sources}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _read(shard: str) -> dict[str, dict[str, bytes]]:
  return dict(_members(shard, 10**6))


def test_make_data_builds_imagenet_sample_and_flickr8k_from_a_mirror(data_dir, tmp_path):
  sources, out = _sources(data_dir, tmp_path), tmp_path / "data"
  log = _get_data(out, sources)
  assert "flickr8k: built" in log and "imagenet_sample: built" in log, log

  # ImageNet sample: the shared layout; labels in sorted-wnid order, 160x160 JPEGs.
  folder = out / "imagenet_sample"
  wnids = json.loads((folder / "wnids.json").read_text())
  names = json.loads((folder / "classnames.json").read_text())
  assert wnids == sorted(wnids) and len(wnids) == 3
  shared = os.path.join(data_dir, "imagenet_sample")
  with open(os.path.join(shared, "wnids.json"), encoding="utf-8") as f:
    shared_wnids = json.load(f)
  with open(os.path.join(shared, "classnames.json"), encoding="utf-8") as f:
    shared_names = json.load(f)
  assert names == [shared_names[shared_wnids.index(w)] for w in wnids]
  samples = _read(str(folder / "imagenet_sample-00000.tar"))
  assert len(samples) == 3
  for key, parts in samples.items():
    assert int(parts["cls"]) == wnids.index(key.split("_", 1)[0])
    with Image.open(io.BytesIO(parts["jpg"])) as img:
      assert img.size == (160, 160) and img.format == "JPEG"
  # vlpre's own reader indexes the shard: whole samples, nothing damaged.
  index = tar_index.ShardIndex([str(folder / "imagenet_sample-00000.tar")])
  assert len(index) == 3 and not index.bad_reasons

  # Flickr8k: every caption of every photo, in its split.
  train = _read(str(out / "flickr8k" / "train-00000.tar"))
  val = _read(str(out / "flickr8k" / "val-00000.tar"))
  assert len(train) == 3 and len(val) == 1
  assert all(len(json.loads(p["json"])["captions"]) == 5 for p in [*train.values(), *val.values()])
  for set_name in ("flickr8k", "imagenet_sample"):
    assert (out / set_name / "SHA256SUMS").read_text().count("\n") == len(os.listdir(
        out / set_name)) - 1

  # A rerun keeps what matches its checksums and rebuilds a set that does not.
  shard = out / "imagenet_sample" / "imagenet_sample-00000.tar"
  before = shard.stat().st_mtime_ns
  log = _get_data(out, sources)
  assert "flickr8k: kept (checksums match)" in log and "imagenet_sample: kept" in log, log
  assert shard.stat().st_mtime_ns == before
  (out / "imagenet_sample" / "classnames.json").write_text("[]\n")
  (out / "flickr8k.partial").mkdir()  # what an interrupted build leaves
  log = _get_data(out, sources)
  assert "imagenet_sample: built" in log and "flickr8k: kept (checksums match)" in log, log
  assert json.loads((out / "imagenet_sample" / "classnames.json").read_text()) == names
  assert not (out / "flickr8k.partial").exists()


def test_an_unreachable_source_is_one_line(tmp_path):
  sources = tmp_path / "sources.json"
  sources.write_text(json.dumps({"imagenet_sample": [f"file://{tmp_path}/nowhere", "0" * 40]}))
  result = subprocess.run(
      [sys.executable, SCRIPT, f"--out={tmp_path / 'data'}", "--sets=imagenet_sample",
       f"--sources={sources}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("get_data: git -C ") and line.endswith(
      "is the network (or the --sources mirror) reachable?"), line
  assert not (tmp_path / "data" / "imagenet_sample").exists()
