"""Data sources: data-dir resolution, tar shard indexing/reading, TFDS (built locally)."""
import importlib
import io
import json
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from vlpre.data import convert
from vlpre.data import sources


def test_resolve_data_dir_precedence(tmp_path, monkeypatch, data_dir):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
  assert os.path.samefile(sources.resolve_data_dir(), data_dir)  # <repo>/../shared/data
  assert sources.resolve_data_dir(str(a)) == str(a)
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(b))
  assert sources.resolve_data_dir(str(a)) == str(b)  # the env var wins
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match=sources.DATA_DIR_ENV):
    sources.resolve_data_dir()


def test_tar_source_flickr(data_dir):
  start = time.perf_counter()
  src = sources.TarShardSource(["flickr8k/train-*.tar", "flickr8k/val-*.tar"], data_dir=data_dir)
  elapsed = time.perf_counter() - start
  assert elapsed < 1.5, f"indexing 7 shards took {elapsed:.2f}s"
  assert len(src) == 7000 and len(src.shards) == 7
  assert [os.path.basename(s) for s in src.shards[:2]] == ["train-00000.tar", "train-00001.tar"]
  first = src[0]
  assert set(first) == {"__key__", "jpg", "json"} and first["__key__"] == "1000268201_693b08cb0e"
  assert first["jpg"][:2] == b"\xff\xd8"
  meta = json.loads(first["json"])
  assert len(meta["captions"]) == 5 and meta["filename"] == "1000268201_693b08cb0e.jpg"
  assert Image.open(io.BytesIO(first["jpg"])).size == (160, 160)
  assert src[-1]["__key__"] == src[6999]["__key__"]
  with pytest.raises(IndexError):
    src[7000]
  # Keys are sorted within each split; train and val are disjoint.
  train_keys = [src[i]["__key__"] for i in range(0, 6000, 250)]
  assert train_keys == sorted(train_keys)
  assert "samples=7000" in repr(src)


def test_tar_source_matches_tarfile(data_dir):
  src = sources.TarShardSource("cifar10/test-00001.tar", data_dir=data_dir)
  assert len(src) == 5000
  with tarfile.open(src.shards[0]) as tf:
    members = [tf.next() for _ in range(6)]
    want = {m.name: tf.extractfile(m).read() for m in members}
  for i in range(3):
    record = src[i]
    key = record["__key__"]
    assert record["png"] == want[f"{key}.png"] and record["cls"] == want[f"{key}.cls"]


def test_tar_source_pickles_without_open_files(data_dir):
  src = sources.TarShardSource("cifar10/train-*.tar", data_dir=data_dir)
  src[0]  # opens a file in this process
  clone = pickle.loads(pickle.dumps(src))
  assert clone._fds is None
  assert clone[123] == src[123]


def test_tar_source_errors(tmp_path, data_dir):
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.TarShardSource("flickr8k/nothing-*.tar", data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.TarShardSource(str(tmp_path / "*.tar"))


def _write_tar(path, members, fmt=tarfile.USTAR_FORMAT):
  with tarfile.open(path, "w", format=fmt) as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))


def test_tar_source_grouping_and_pax_fallback(tmp_path):
  long_dir = "d" * 120  # needs the ustar prefix field or a pax header
  members = [("a.jpg", b"A"), ("a.json", b"{}"), ("b.x.cls", b"1"), ("b.x.png", b"B"),
             (f"{long_dir}/c.txt", b"hi"), ("noext", b"?"), ("._hidden.jpg", b"mac"),
             ("a.txt", b"again")]  # same key, not adjacent: a separate sample
  for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
    path = tmp_path / f"t{fmt}.tar"
    _write_tar(path, members, fmt)
    src = sources.TarShardSource(str(path))
    got = [src[i] for i in range(len(src))]
    assert got == [
        {"__key__": "a", "jpg": b"A", "json": b"{}"},
        {"__key__": "b", "x.cls": b"1", "x.png": b"B"},
        {"__key__": f"{long_dir}/c", "txt": b"hi"},
        {"__key__": "a", "txt": b"again"},
    ], fmt


def test_sniff_image_ext():
  assert sources._sniff_image_ext(b"\x89PNG\r\n\x1a\n....") == "png"
  assert sources._sniff_image_ext(b"\xff\xd8\xff\xe0") == "jpg"
  assert sources._sniff_image_ext(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"


# ------------------------------------------------------------------------------- TFDS


def _make_tiny_tfds(data_dir: str) -> None:
  """Prepares a 6-example image/label/caption TFDS dataset as array_record, without TF.

  TFDS encodes numpy images with TensorFlow, but passes already-encoded file objects
  through, so PNG bytes are handed over as BytesIO.
  """
  import tensorflow_datasets as tfds

  class VlpreTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    # No source file to look for checksums next to. (TFDS otherwise resolves the
    # `tests` package, which needs importlib_resources when it is a namespace package.)
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["cat", "dog", "bird"]),
          "captions": tfds.features.Sequence(tfds.features.Text()),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(6)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(0)
      for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)).save(buf, "PNG")
        buf.seek(0)
        yield i, {"image": buf, "label": i % 3, "captions": [f"caption {i} a", f"caption {i} b"]}

  VlpreTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  importlib.import_module("tensorflow_datasets")
  path = str(tmp_path_factory.mktemp("tfds"))
  _make_tiny_tfds(path)
  return path


def test_tfds_source(tfds_dir):
  src = sources.TfdsSource("vlpre_tiny_images", "train", tfds_dir, text_key="captions")
  assert len(src) == 6 and src.classnames == ["cat", "dog", "bird"]
  seen = {}
  for i in range(len(src)):
    record = src[i]
    assert set(record) == {"__key__", "png", "cls", "json"}
    image = np.asarray(Image.open(io.BytesIO(record["png"])))
    captions = json.loads(record["json"])["captions"]
    seen[captions[0]] = (image.shape, int(record["cls"]))
  assert seen == {f"caption {i} a": ((10 + i, 12, 3), i % 3) for i in range(6)}
  clone = pickle.loads(pickle.dumps(src))
  assert clone[2] == src[2]
  assert len(sources.TfdsSource("vlpre_tiny_images", "train[:2]", tfds_dir)) == 2


def test_tfds_source_not_prepared(tmp_path):
  importlib.import_module("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    sources.TfdsSource("mnist", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="unknown and not prepared"):
    sources.TfdsSource("no_such_dataset_xyz", "train", str(tmp_path))


def test_convert_tfds_round_trip(tfds_dir, tmp_path):
  stats = convert.convert_tfds("vlpre_tiny_images", "train", str(tmp_path / "out"),
                               data_dir=tfds_dir, samples_per_shard=4, text_key="captions")
  assert stats.num_written == 6 and stats.num_bad == 0 and len(stats.shards) == 2
  src = sources.TarShardSource(str(tmp_path / "out" / "train-*.tar"))
  assert [src[i]["__key__"] for i in range(6)] == [str(i) for i in range(6)]
  tfds_src = sources.TfdsSource("vlpre_tiny_images", "train", tfds_dir, text_key="captions")
  for i in range(6):
    assert src[i]["png"] == tfds_src[i]["png"] and src[i]["cls"] == tfds_src[i]["cls"]
    assert json.loads(src[i]["json"]) == json.loads(tfds_src[i]["json"])
  with open(tmp_path / "out" / "classnames.json") as f:
    assert json.load(f) == ["cat", "dog", "bird"]


def test_tfds_through_the_pipelines(tfds_dir):
  import ml_collections
  from vlpre import data
  cfg = ml_collections.ConfigDict(dict(
      data_dir=tfds_dir, kind="tfds", tfds_name="vlpre_tiny_images", tfds_split="train",
      label=False, image_size=8, resize_size=9, augment="resize_random_crop", flip=True,
      max_text_len=8, num_workers=0, prefetch_buffer_size=0, shuffle=True))
  tok = data.get_tokenizer("clip_bpe")
  batch = next(iter(data.build_train_dataset(cfg, global_batch_size=4, seed=0, tokenizer=tok)))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["text"].shape == (4, 8)
  cfg.label = True
  batch = next(iter(data.build_train_dataset(cfg, global_batch_size=6, seed=0, tokenizer=None)))
  assert sorted(batch["label"].tolist()) == [0, 0, 1, 1, 2, 2]
  source = sources.TfdsSource("vlpre_tiny_images", "train", tfds_dir)
  batches = list(data.iterate_eval(source, image_size=8, resize_size=8, batch_size=4,
                                   with_labels=True))
  assert [b["mask"].sum() for b in batches] == [4, 2]
