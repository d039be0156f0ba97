"""Converter: image folders + captions / class folders -> shards, read back with TarShardSource."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlpre.data import convert
from vlpre.data import sources
from vlpre.data import transforms as T


def _save(path, size=(30, 20), fmt=None, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  w, h = size
  channels = {"RGB": (h, w, 3), "RGBA": (h, w, 4), "L": (h, w)}[mode]
  Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode).save(path, format=fmt)


@pytest.fixture
def caption_folder(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  _save(images / "b.photo.png", fmt="PNG", seed=1)
  _save(images / "a.jpg", size=(40, 80), fmt="JPEG", seed=2)
  _save(images / "c.png", fmt="PNG", mode="RGBA", seed=3)
  (images / "broken.jpg").write_bytes(b"definitely not a jpeg")
  return images


def _read_all(pattern):
  src = sources.TarShardSource(pattern)
  return src, [src[i] for i in range(len(src))]


def test_captions_csv_round_trip(caption_folder, tmp_path):
  csv_path = tmp_path / "captions.csv"
  csv_path.write_text(
      "filename,caption\n"
      "a.jpg,A dog runs.\n"
      "b.photo.png,\"A cat, sleeping\"\n"
      "a.jpg,  A second caption  \n"
      "c.png,Café au lait\n"
      "broken.jpg,never written\n"
      "missing.jpg,no such file\n", encoding="utf-8")
  out = tmp_path / "out"
  stats = convert.convert_captions(str(caption_folder), str(csv_path), str(out), split="val",
                                   samples_per_shard=2)
  assert stats.num_written == 3 and stats.num_bad == 2  # broken.jpg, missing.jpg
  assert any("broken" in b for b in stats.bad) and any("missing.jpg" in b for b in stats.bad)
  assert sorted(os.listdir(out)) == ["val-00000.tar", "val-00001.tar"]
  src, records = _read_all(str(out / "val-*.tar"))
  assert [r["__key__"] for r in records] == ["a", "b_photo", "c"]  # sorted, '.' -> '_'
  meta = [json.loads(r["json"]) for r in records]
  assert meta[0] == {"captions": ["A dog runs.", "A second caption"], "filename": "a.jpg"}
  assert meta[1]["captions"] == ["A cat, sleeping"] and meta[2]["captions"] == ["Café au lait"]
  # No resize: RGB JPEG/PNG bytes kept as they are; the RGBA PNG is re-encoded as RGB.
  assert records[0]["jpg"] == (caption_folder / "a.jpg").read_bytes()
  assert records[1]["png"] == (caption_folder / "b.photo.png").read_bytes()
  decoded = T.DecodeImage().map(records[2])["image"]
  assert decoded.shape == (20, 30, 3)
  # Layout: image member first, then json; ustar headers with mtime 0.
  with tarfile.open(out / "val-00000.tar") as tf:
    members = tf.getmembers()
  assert [m.name for m in members] == ["a.jpg", "a.json", "b_photo.png", "b_photo.json"]
  assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)


def test_captions_jsonl_with_resize_is_reproducible(caption_folder, tmp_path):
  jsonl = tmp_path / "captions.jsonl"
  rows = [{"filename": "a.jpg", "captions": ["one", "two"]},
          {"filename": "c.png", "caption": "three"}]
  jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  outs = []
  for name in ("out1", "out2"):
    stats = convert.convert_captions(str(caption_folder), str(jsonl), str(tmp_path / name),
                                     resize=10, image_format="jpg")
    assert stats.num_written == 2
    outs.append((tmp_path / name / "train-00000.tar").read_bytes())
  assert outs[0] == outs[1]  # byte-identical rebuilds
  _, records = _read_all(str(tmp_path / "out1" / "train-*.tar"))
  shapes = [np.asarray(Image.open(io.BytesIO(r["jpg"]))).shape for r in records]
  assert shapes == [(20, 10, 3), (10, 15, 3)]  # shorter side 10
  assert json.loads(records[0]["json"])["captions"] == ["one", "two"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_of_image_paths_and_captions(caption_folder, tmp_path, fmt):
  """--mode=table: (image path, caption) rows, paths relative to the table's folder, in
  nested folders; rows of one image become one sample."""
  (caption_folder / "sub").mkdir()
  _save(caption_folder / "sub" / "a.jpg", fmt="JPEG", seed=7)  # same name, other folder
  rows = [("images/a.jpg", "A dog runs."), ("images/sub/a.jpg", "Another dog"),
          ("images/a.jpg", "The dog again"), ("./images/c.png", "Café"),
          ("images/missing.jpg", "no such file"), ("images/broken.jpg", "not an image")]
  if fmt == "csv":
    table = tmp_path / "pairs.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["path", "text"])
      writer.writerows(rows)
  else:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"path": [r[0] for r in rows], "text": [r[1] for r in rows]}), table)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=r"needs the columns 'image' and 'caption'.*'path', 'text'"):
    convert.convert_table(str(table), str(out))
  stats = convert.convert_table(str(table), str(out), image_column="path", caption_column="text")
  assert stats.num_written == 3 and stats.num_bad == 2
  _, records = _read_all(str(out / "train-*.tar"))
  by_key = {r["__key__"]: r for r in records}
  assert sorted(by_key) == ["images_a", "images_c", "images_sub_a"]
  assert json.loads(by_key["images_a"]["json"])["captions"] == ["A dog runs.", "The dog again"]
  assert by_key["images_sub_a"]["jpg"] == (caption_folder / "sub" / "a.jpg").read_bytes()
  parsed = T.ParseCaption(pick="all").map(dict(by_key["images_sub_a"]))
  assert parsed["captions"] == ["Another dog"]
  assert json.loads(by_key["images_c"]["json"])["captions"] == ["Café"]
  url_table = tmp_path / "urls.csv"
  url_table.write_text("image,caption\nhttps://example.com/x.jpg,a cat\n")
  with pytest.raises(ValueError, match="is a URL"):
    convert.convert_table(str(url_table), str(tmp_path / "out2"))
  # A path that leaves the table's folder is refused, as every name in a data file is.
  url_table.write_text(f"image,caption\n{caption_folder / 'a.jpg'},a dog\n")
  with pytest.raises(ValueError, match="is not a relative path inside"):
    convert.convert_table(str(url_table), str(tmp_path / "out3"))


def test_class_folders_round_trip(tmp_path):
  root = tmp_path / "classes"
  for c, name in enumerate(["dog", "cat", "bird"]):
    (root / name).mkdir(parents=True)
    for i in range(2):
      _save(root / name / f"img{i}.png", size=(12, 12), fmt="PNG", seed=10 * c + i)
  (root / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
  (root / "cat" / "notes.txt").write_text("ignored")
  stats = convert.convert_class_folders(str(root), str(tmp_path / "out"), samples_per_shard=4)
  assert stats.num_written == 6 and stats.num_bad == 1 and "cat_bad" in stats.bad[0]
  _, records = _read_all(str(tmp_path / "out" / "train-*.tar"))
  names = json.loads((tmp_path / "out" / "classnames.json").read_text())
  assert names == ["bird", "cat", "dog"]  # sorted folder names define the indices
  got = {r["__key__"]: names[int(r["cls"])] for r in records}
  assert got == {f"{n}_img{i}": n for n in names for i in range(2)}
  label = T.ParseLabel().map(records[0])["label"]
  assert label == 0 and records[0]["__key__"] == "bird_img0"


@pytest.mark.integration
def test_cli(tmp_path):
  root = tmp_path / "classes"
  (root / "a").mkdir(parents=True)
  _save(root / "a" / "x.jpg", fmt="JPEG")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "vlpre.data.convert", "--mode=classes", f"--images_dir={root}",
       f"--out_dir={tmp_path / 'out'}", "--split=test", "--resize=8"],
      capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
      timeout=60)
  assert result.returncode == 0, result.stderr
  assert "wrote 1 samples in 1 shards" in result.stdout
  _, records = _read_all(str(tmp_path / "out" / "test-*.tar"))
  assert records[0]["__key__"] == "a_x" and records[0]["cls"] == b"0"
  assert Image.open(io.BytesIO(records[0]["jpg"])).size == (12, 8)
  # --mode=table with a wrong column: one line, exit 1, no traceback.
  (tmp_path / "pairs.csv").write_text("path,text\nclasses/a/x.jpg,a photo\n")
  result = subprocess.run(
      [sys.executable, "-m", "vlpre.data.convert", "--mode=table",
       f"--table={tmp_path / 'pairs.csv'}", f"--out_dir={tmp_path / 'out2'}"],
      capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
      timeout=60)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].endswith(
      "needs the columns 'image' and 'caption' (--image_column, --caption_column); it has "
      "['path', 'text']")


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with (__import__("gzip").open if str(path).endswith(".gz") else open)(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip_and_truncation(tmp_path):
  rng = np.random.default_rng(0)
  idx = tmp_path / "idx"
  idx.mkdir()
  data = {}
  for prefix, n in (("train", 7), ("t10k", 3)):
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    _write_idx(idx / f"{prefix}-images-idx3-ubyte.gz", images)
    _write_idx(idx / f"{prefix}-labels-idx1-ubyte", labels)  # one split gzipped, one not
    data[{"train": "train", "t10k": "test"}[prefix]] = images, labels
  out = tmp_path / "out"
  stats = convert.convert_idx(str(idx), str(out), samples_per_shard=4)
  assert {k: s.num_written for k, s in stats.items()} == {"train": 7, "test": 3}
  assert json.loads((out / "classnames.json").read_text())[9] == "ankle boot"
  for split, (images, labels) in data.items():
    src, records = _read_all(str(out / f"{split}-*.tar"))
    assert [r["__key__"] for r in records] == [f"{split}_{i}" for i in range(len(labels))]
    for i, record in enumerate(records):
      decoded = T.DecodeImage().map(dict(record))["image"]
      assert decoded.shape == (28, 28, 3)
      np.testing.assert_array_equal(decoded[..., 0], images[i])  # lossless, gray → RGB
      assert int(record["cls"]) == labels[i]
  # An interrupted download: the header declares more bytes than the file holds.
  raw = (idx / "train-labels-idx1-ubyte").read_bytes()
  (idx / "train-labels-idx1-ubyte").write_bytes(raw[:-2])
  with pytest.raises(ValueError, match="header declares"):
    convert.convert_idx(str(idx), str(tmp_path / "out2"))


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.system_data(FASHION, "dataset-fashion-mnist")
def test_idx_real_fashion_mnist(tmp_path):
  """The real files of Debian's dataset-fashion-mnist (.ci/run installs it; elsewhere the
  test skips with that reason where the package is missing, conftest.py)."""
  assert os.path.isdir(FASHION), "apt-get install dataset-fashion-mnist (done by .ci/run)"
  stats = convert.convert_idx(FASHION, str(tmp_path), max_per_split=100)
  assert {k: s.num_written for k, s in stats.items()} == {"train": 100, "test": 100}
  _, records = _read_all(str(tmp_path / "train-*.tar"))
  labels = [int(r["cls"]) for r in records]
  # The published first labels of each split: ankle boot, then t-shirt, t-shirt, dress.
  assert labels[:4] == [9, 0, 0, 3]
  assert set(labels) == set(range(10))
  _, test_records = _read_all(str(tmp_path / "test-*.tar"))
  assert [int(r["cls"]) for r in test_records[:3]] == [9, 2, 1]


def test_system_data_skips_with_its_reason_outside_ci_only(tmp_path):
  from tests import conftest  # pylint: disable=g-import-not-at-top
  missing = str(tmp_path / "nowhere")
  reason = conftest.system_data_skip_reason(missing, "dataset-x", {})
  assert reason.startswith(f"{missing} is missing: apt-get install dataset-x")
  assert conftest.system_data_skip_reason(missing, "dataset-x", {"CI": "true"}) is None
  assert conftest.system_data_skip_reason(str(tmp_path), "dataset-x", {}) is None
