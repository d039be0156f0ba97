"""Zero-shot and retrieval read clip_benchmark's webdataset layout and TFDS splits, and give
the metric the same images give through vlpre's own shards."""
import importlib
import importlib.util
import io
import json
import os
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from tests import helpers
from vlpre import check
from vlpre import data
from vlpre import sharding
from vlpre import train_state
from vlpre.evaluators import common
from vlpre.evaluators import retrieval
from vlpre.evaluators import zeroshot

N = 16  # samples per eval set: two batches of 8 over the 8 devices


def _read_samples(path: str, n: int) -> list[dict[str, bytes]]:
  """The first `n` samples of a vlpre shard: {"__key__": key, ext: bytes}."""
  samples: list[dict] = []
  with tarfile.open(path) as tar:
    for member in tar:
      key, ext = member.name.split(".", 1)
      if not samples or samples[-1]["__key__"] != key:
        if len(samples) == n:
          break
        samples.append({"__key__": key})
      samples[-1][ext] = tar.extractfile(member).read()
  return samples


def _write_tar(path: str, samples: list[dict[str, bytes]]) -> None:
  with tarfile.open(path, "w") as tar:
    for sample in samples:
      for ext, payload in sample.items():
        if ext != "__key__":
          info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))


def _webp_lossless(png: bytes) -> bytes:
  buf = io.BytesIO()
  Image.open(io.BytesIO(png)).save(buf, format="webp", lossless=True)
  return buf.getvalue()


def _make_tfds(data_dir: str, cifar: list[dict], flickr: list[dict], classnames: list[str]) -> None:
  """Two tiny TFDS datasets (array_record, stored in generation order) of the same images."""
  import tensorflow_datasets as tfds

  class VlpreEvalCifar(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see tests/test_data_sources.py

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=classnames)}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, s in enumerate(cifar):
        yield i, {"image": io.BytesIO(s["png"]), "label": int(s["cls"])}

  class VlpreEvalFlickr(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "captions": tfds.features.Sequence(tfds.features.Text())}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, s in enumerate(flickr):
        yield i, {"image": io.BytesIO(s["jpg"]), "captions": json.loads(s["json"])["captions"]}

  for builder in (VlpreEvalCifar, VlpreEvalFlickr):
    builder(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def eval_sets(data_dir, tmp_path_factory):
  """The first 16 CIFAR-10 test and Flickr8k val samples as vlpre shards, in clip_benchmark's
  layout (CIFAR as lossless WebP, split over two shards) and as TFDS datasets."""
  root = tmp_path_factory.mktemp("eval_sets")
  cifar = _read_samples(os.path.join(data_dir, "cifar10/test-00000.tar"), N)
  flickr = _read_samples(os.path.join(data_dir, "flickr8k/val-00000.tar"), N)
  with open(os.path.join(data_dir, "cifar10/classnames.json")) as f:
    classnames = json.load(f)
  os.makedirs(root / "vlpre")
  _write_tar(str(root / "vlpre/cifar-00000.tar"), cifar)
  _write_tar(str(root / "vlpre/flickr-00000.tar"), flickr)

  cb_cifar = root / "wds_cifar10"
  os.makedirs(cb_cifar / "test")
  renamed = [{"__key__": f"s{i:07d}", "webp": _webp_lossless(s["png"]), "cls": s["cls"]}
             for i, s in enumerate(cifar)]
  _write_tar(str(cb_cifar / "test/0.tar"), renamed[:N // 2])
  _write_tar(str(cb_cifar / "test/1.tar"), renamed[N // 2:])
  (cb_cifar / "test/nshards.txt").write_text("2\n")
  (cb_cifar / "classnames.txt").write_text("\n".join(classnames) + "\n")
  (cb_cifar / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")

  cb_flickr = root / "wds_flickr8k"
  os.makedirs(cb_flickr / "test")
  _write_tar(str(cb_flickr / "test/0.tar"), [
      {"__key__": f"s{i:07d}", "jpg": s["jpg"],
       "txt": "\n".join(json.loads(s["json"])["captions"]).encode()} for i, s in enumerate(flickr)])
  (cb_flickr / "dataset_type.txt").write_text("retrieval\n")

  importlib.import_module("tensorflow_datasets")
  _make_tfds(str(root / "tfds"), cifar, flickr, classnames)
  return root


@pytest.fixture(scope="module")
def tiny_clip(data_dir):
  config = helpers.tiny_clip_config(data_dir)
  example = {"image": np.zeros((16, 32, 32, 3), np.float32), "text": np.zeros((16, 16), np.int32),
             "text_mask": np.ones((16, 16), np.int32)}
  s = train_state.setup(config, example)
  return s, common.Predictor(s, data.get_tokenizer("clip_bpe"))


def _run(tiny_clip, module, cfg):
  s, predictor = tiny_clip
  size = dict(image_size=32, resize_size=36, batch_size=16, max_text_len=16)
  with sharding.active(s.mesh, s.rules):
    return module.Evaluator("e", {**size, **cfg}, predictor).run(s.variables())


def test_a_trained_text_tower_is_embedded_at_every_call(tiny_clip):
  """CLIP's text tower trains, so its embeddings are never served from memory."""
  s, predictor = tiny_clip
  assert predictor.fixed_text_inputs is None
  texts = ["a photo of a dog", "a photo of a cat"] * 4
  before = predictor.text_embeddings(s.variables(), texts, 16)
  trained = s.state.replace(params=jax.tree.map(lambda x: x * 0.5, s.state.params))
  after = predictor.text_embeddings(s.variables(trained), texts, 16)
  assert not np.allclose(before, after)


def test_clip_benchmark_source_reads_the_layout(eval_sets):
  src = data.ClipBenchmarkSource(str(eval_sets / "wds_flickr8k"))
  assert len(src) == N and src.classnames is None and src.templates is None
  record = src[3]
  assert set(record) == {"__key__", "jpg", "json"} and len(json.loads(record["json"])["captions"]) == 5
  src = data.ClipBenchmarkSource(str(eval_sets / "wds_cifar10"))
  assert src.classnames[:2] == ["airplane", "automobile"] and src.templates == ["a photo of a {c}."]
  assert [src[i]["__key__"] for i in (7, 8)] == ["s0000007", "s0000008"]  # 0.tar, then 1.tar


def test_zeroshot_same_metric_in_every_format(eval_sets, tiny_clip):
  tfds_dir = str(eval_sets / "tfds")
  ours = _run(tiny_clip, zeroshot, dict(data=str(eval_sets / "vlpre/cifar-*.tar"),
                                         classnames="cifar10", templates="photo"))
  # clip_benchmark's own class names and "{c}" templates file; lossless WebP images.
  cb = _run(tiny_clip, zeroshot, dict(format="clip_benchmark", data=str(eval_sets / "wds_cifar10")))
  tf = _run(tiny_clip, zeroshot, dict(format="tfds", data="vlpre_eval_cifar", split="test",
                                       tfds_data_dir=tfds_dir))
  assert list(ours) == ["e/top1", "e/mean_per_class_recall"] and ours == cb == tf
  # Beneath the metric: the same images, labels and embeddings, in the same order.
  s, predictor = tiny_clip
  outputs = []
  for cfg in (dict(data=str(eval_sets / "vlpre/cifar-*.tar")),
              dict(format="clip_benchmark", data=str(eval_sets / "wds_cifar10")),
              dict(format="tfds", data="vlpre_eval_cifar", tfds_data_dir=tfds_dir)):
    split = data.open_eval_split(cfg, labels=True)
    batches = common.eval_batches(dict(image_size=32, batch_size=16), split.source, with_labels=True)
    with sharding.active(s.mesh, s.rules):
      outputs.append(predictor.image_embeddings(s.variables(), batches))
  for other in outputs[1:]:
    np.testing.assert_array_equal(other["label"], outputs[0]["label"])
    np.testing.assert_array_equal(other["zimg"], outputs[0]["zimg"])
  assert len(set(outputs[0]["label"].tolist())) > 5
  # A template that differs changes the prompts (so the file's templates were the ones read).
  other = zeroshot.Evaluator("e", dict(format="clip_benchmark", data=str(eval_sets / "wds_cifar10"),
                                       templates=["{c}"]), tiny_clip[1])
  assert other.templates == ("{c}",) and zeroshot.fill("{c}", "cat") == "cat"


def test_retrieval_same_metric_in_every_format(eval_sets, tiny_clip):
  ours = _run(tiny_clip, retrieval, dict(data=str(eval_sets / "vlpre/flickr-*.tar")))
  cb = _run(tiny_clip, retrieval, dict(format="clip_benchmark", data=str(eval_sets / "wds_flickr8k")))
  # The prepared dataset's own folder: read from its files alone (builder_from_directory).
  folder = str(eval_sets / "tfds/vlpre_eval_flickr/1.0.0")
  tf = _run(tiny_clip, retrieval, dict(format="tfds", data=folder, split="test"))
  assert len(ours) == 6 and ours == cb == tf


def test_bad_eval_sets_are_one_line_errors(eval_sets, tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no .tar shards"):
    data.open_eval_split(dict(format="clip_benchmark", data=str(tmp_path)))
  with pytest.raises(ValueError, match="unknown eval format 'coco'"):
    data.open_eval_split(dict(format="coco", data=str(tmp_path)))
  with pytest.raises(ValueError, match="no class names"):  # a retrieval set has no classnames.txt
    zeroshot.Evaluator("e", dict(format="clip_benchmark", data=str(eval_sets / "wds_flickr8k")), None)
  bad = tmp_path / "bad"
  os.makedirs(bad / "test")
  _write_tar(str(bad / "test/0.tar"), [{"__key__": "s0", "jpg": b"x", "txt": b"\xff\xfe"}])
  assert "not UTF-8" in data.ClipBenchmarkSource(str(bad))[0]["_bad"]
  evals = {"a": dict(kind="zeroshot", format="clip_benchmark", data=str(tmp_path / "missing")),
           "b": dict(kind="retrieval", format="tfds", data="no_such_dataset_xyz",
                     tfds_data_dir=str(tmp_path)),
           "c": dict(kind="retrieval", format="coco", data="x")}
  problems = check._check_evals({"evals": evals})  # pylint: disable=protected-access
  assert [p.split(":")[0] for p in problems] == ["evals.a.data", "evals.b.data", "evals.c.format"]
  assert all("\n" not in p for p in problems)


def test_mean_per_class_recall_matches_a_naive_reference():
  rng = np.random.default_rng(0)
  labels = rng.choice(7, size=200, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0])  # class 6 absent
  pred = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 8, 200))  # 7: never a label
  recalls = []
  for c in range(8):
    rows = [i for i in range(200) if labels[i] == c]
    if rows:
      recalls.append(sum(pred[i] == c for i in rows) / len(rows))
  got = common.mean_per_class_recall(pred, labels)
  np.testing.assert_allclose(got, np.mean(recalls), rtol=1e-12)
  assert abs(got - np.mean(pred == labels)) > 0.01  # imbalanced: not the plain accuracy
  assert common.mean_per_class_recall(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == 0.75


class _RecordingPredictor:
  """Stands in for common.Predictor: a fixed embedding per prompt, prompts recorded."""

  def __init__(self):
    self.prompts = []

  def text_embeddings(self, variables, texts, max_len):
    del variables, max_len
    self.prompts += list(texts)
    return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts])


def test_openai_imagenet_templates_are_clips_80_and_ensembled(data_dir):
  # open_clip's own list; its file imports nothing (importing open_clip would need torchvision).
  spec = importlib.util.find_spec("open_clip")
  path = os.path.join(os.path.dirname(spec.origin), "zero_shot_metadata.py")
  metadata = importlib.util.module_from_spec(importlib.util.spec_from_file_location("zsm", path))
  metadata.__spec__.loader.exec_module(metadata)
  want = tuple(t("{}") for t in metadata.OPENAI_IMAGENET_TEMPLATES)
  assert len(want) == 80 and zeroshot.TEMPLATES["openai_imagenet"] == want
  predictor = _RecordingPredictor()
  ev = zeroshot.Evaluator("e", dict(data="cifar10/test-*.tar", data_dir=data_dir,
                                    classnames="cifar10", templates="openai_imagenet"), predictor)
  z_CxE = ev.class_embeddings(None)
  assert z_CxE.shape == (10, 8) and len(predictor.prompts) == 800
  assert predictor.prompts[:2] == ["a bad photo of a airplane.", "a photo of many airplane."]
  # Each class: its 80 prompt embeddings, l2-normalised, averaged, normalised again.
  z = predictor.text_embeddings(None, predictor.prompts[80:160], 0)
  mean = (z / np.linalg.norm(z, axis=1, keepdims=True)).mean(0)
  np.testing.assert_allclose(z_CxE[1], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no template set 'openai80'; sets: photo, clip7, openai_imagenet"):
    zeroshot.Evaluator("e", dict(data="cifar10/test-*.tar", data_dir=data_dir,
                                 classnames="cifar10", templates="openai80"), predictor)
