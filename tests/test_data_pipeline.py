"""Train/eval pipelines: shapes, bad-sample accounting, checkpoint state, host slicing."""
import gc
import importlib
import io
import json
import logging
import tarfile

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlpre import data
from vlpre.data import records as records_lib

from tests import helpers


@pytest.fixture(scope="module")
def clip_tok():
  return data.get_tokenizer("clip_bpe")


def make_cfg(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      data_dir=None, train="flickr8k/train-*.tar", kind="tar", tfds_name="", tfds_split="train",
      image_key=None, caption_field="captions", label=False, image_size=32, resize_size=36,
      augment="resize_random_crop", flip=True, max_text_len=16, num_workers=0,
      prefetch_buffer_size=2, shuffle=True))
  cfg.update(overrides)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == set(w)
    assert list(g["_key"]) == list(w["_key"]) and g["_num_bad"] == w["_num_bad"]
    for k in g:
      if not k.startswith("_"):
        np.testing.assert_array_equal(g[k], w[k], err_msg=k)


# --------------------------------------------------------------- a tar with bad samples


def _jpeg(seed, size=(24, 20)):
  buf = io.BytesIO()
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _caption_json(*captions):
  return json.dumps({"captions": list(captions)}).encode()


# key -> (members, bad reason fragment or None). 30 samples, 10 bad: 5 at even and 5 at
# odd indices, and the last sample of each parity is good, so with shuffle=False the bad
# samples of an epoch (or of a 2-worker slice's epoch) are all accounted within it.
def _mixed_samples():
  samples = {}
  for i in range(30):
    samples[f"s{i:03d}"] = ({"jpg": _jpeg(i), "json": _caption_json(f"a photo number {i}", "")}, None)
  bad = {
      "s002": ({"jpg": b"\xff\xd8 this is not a jpeg", "json": _caption_json("x")}, "cannot decode"),
      "s005": ({"jpg": _jpeg(5)[:150], "json": _caption_json("x")}, "cannot decode"),
      "s007": ({"jpg": _jpeg(7), "json": _caption_json("", "   ")}, "no non-empty caption"),
      "s011": ({"jpg": _jpeg(11), "json": b'{"captions": ["caf\xe9 au lait"]}'}, "not UTF-8"),
      "s012": ({"jpg": _jpeg(12), "json": b"{broken"}, "bad caption member"),
      "s013": ({"json": _caption_json("no image")}, "no image member"),
      "s020": ({"jpg": _jpeg(20), "json": _caption_json()}, "no non-empty caption"),
      "s024": ({"png": b"\x89PNG\r\n\x1a\n junk", "json": _caption_json("x")}, "cannot decode"),
      "s022": ({"jpg": _jpeg(22)}, "bad caption member"),
      "s027": ({"jpg": b"", "json": _caption_json("x")}, "cannot decode"),
  }
  samples.update(bad)
  return samples


@pytest.fixture(scope="module")
def mixed_tar(tmp_path_factory):
  path = tmp_path_factory.mktemp("mixed") / "mixed-00000.tar"
  samples = _mixed_samples()
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
    for key in sorted(samples):
      for ext, payload in samples[key][0].items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
  good = [k for k in sorted(samples) if samples[k][1] is None]
  return str(path), good, {k: v[1] for k, v in samples.items() if v[1]}


def test_bad_samples_skipped_and_counted(mixed_tar, clip_tok, caplog):
  path, good, bad = mixed_tar
  assert len(good) == 20 and len(bad) == 10
  cfg = make_cfg(train=path, shuffle=False, flip=False)
  ds = data.build_train_dataset(cfg, global_batch_size=5, seed=0, tokenizer=clip_tok)
  with caplog.at_level(logging.WARNING):
    batches = take(iter(ds), 8)
  epoch1, epoch2 = batches[:4], batches[4:]
  assert [k for b in epoch1 for k in b["_key"]] == good
  assert sum(b["_num_bad"] for b in epoch1) == 10 and sum(b["_num_bad"] for b in epoch2) == 10
  assert [b["_num_bad"] for b in epoch1] == [2, 4, 1, 3]  # s002,s005 | s007,s011-13 | s020 | s022,s024,s027
  text = caplog.text
  for fragment in ("cannot decode", "not UTF-8", "no non-empty caption", "no image member"):
    assert fragment in text
  assert "'s011'" in text


def test_skip_bad_gives_up_on_all_bad_data(tmp_path):
  src = grain.MapDataset.source([{"__key__": str(i), "_bad": "broken"} for i in range(3)]).repeat()
  it = iter(records_lib.SkipBad(src.to_iter_dataset(), max_consecutive_bad=50))
  with pytest.raises(RuntimeError, match="50 bad samples in a row"):
    next(it)


def test_skip_bad_state_is_exact():
  records = [{"__key__": str(i), "v": i} if i % 3 else {"__key__": str(i), "_bad": "x"}
             for i in range(20)]
  ds = records_lib.SkipBad(grain.MapDataset.source(records).to_iter_dataset())
  it = iter(ds)
  take(it, 2)
  state = it.get_state()
  rest = [(r["v"], r["_num_bad"]) for r in it]
  it2 = iter(ds)
  it2.set_state(state)
  assert [(r["v"], r["_num_bad"]) for r in it2] == rest
  assert it2.get_state()["total_bad"] == 7 and it2.total_bad == 7
  json.dumps(state)  # orbax's grain handler stores it as JSON


# ----------------------------------------------------------------------- real datasets


def test_flickr_batches_shapes_and_dtypes(clip_tok, data_dir):
  cfg = make_cfg(data_dir=data_dir)
  ds = data.build_train_dataset(cfg, global_batch_size=8, seed=0, tokenizer=clip_tok)
  batch = next(iter(ds))
  assert set(batch) == {"image", "text", "text_mask", "_key", "_num_bad"}
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["text"].shape == (8, 16) and batch["text"].dtype == np.int32
  assert batch["text_mask"].shape == (8, 16) and batch["text_mask"].dtype == np.int32
  assert (batch["text"][:, 0] == 49406).all()
  lengths = batch["text_mask"].sum(1)
  assert (batch["text"][np.arange(8), lengths - 1] == 49407).all()
  assert batch["_key"].shape == (8,) and batch["_key"].dtype == object
  assert batch["_num_bad"] == 0 and isinstance(batch["_num_bad"], int)
  assert -2.0 < batch["image"].min() < -1.0 and 1.5 < batch["image"].max() < 2.2


@pytest.mark.parametrize("augment", ["random_resized_crop", "center_crop"])
def test_cifar_label_batches(augment, data_dir):
  cfg = make_cfg(data_dir=data_dir, train="cifar10/train-*.tar", label=True, image_size=24,
                 resize_size=32, augment=augment)
  ds = data.build_train_dataset(cfg, global_batch_size=16, seed=1, tokenizer=None)
  batch = next(iter(ds))
  assert set(batch) == {"image", "label", "_key", "_num_bad"}
  assert batch["image"].shape == (16, 24, 24, 3) and batch["label"].dtype == np.int32
  names = data.load_classnames("cifar10", data_dir)
  assert len(names) == 10 and names[3] == "cat"
  for key, label in zip(batch["_key"], batch["label"]):
    assert key.rsplit("_", 1)[0] == names[label]


def test_shuffle_seed_and_epochs(clip_tok, data_dir):
  cfg = make_cfg(data_dir=data_dir, train="flickr8k/val-*.tar")
  keys = lambda seed: list(next(iter(data.build_train_dataset(
      cfg, global_batch_size=8, seed=seed, tokenizer=clip_tok)))["_key"])
  assert keys(0) == keys(0) and keys(0) != keys(1)


def test_hosts_share_every_global_batch_disjointly(clip_tok, data_dir):
  """2 hosts read the single host's global batches: host 0 the first half of each, host 1
  the second, with the same augmentations; no record is read twice."""
  cfg = make_cfg(data_dir=data_dir, train="flickr8k/val-*.tar")

  def batches(host, hosts):
    return take(iter(data.build_train_dataset(cfg, global_batch_size=8, seed=0, tokenizer=clip_tok,
                                              process_index=host, process_count=hosts)), 3)

  single, host0, host1 = batches(0, 1), batches(0, 2), batches(1, 2)
  for one, a, b in zip(single, host0, host1):
    assert a["image"].shape[0] == b["image"].shape[0] == 4
    assert not set(a["_key"]) & set(b["_key"])
    assert list(a["_key"]) + list(b["_key"]) == list(one["_key"])
    for k in ("image", "text", "text_mask"):
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), one[k], err_msg=k)
  with pytest.raises(ValueError, match="split over"):
    data.build_train_dataset(cfg, global_batch_size=5, seed=0, tokenizer=clip_tok, process_count=2)


def test_host_share_of_an_uneven_dataset():
  """HostShare's index map on a finite dataset: whole global batches only, none read twice."""
  ds = grain.MapDataset.range(22)  # 2 global batches of 8 (6 left over)
  shares = [list(records_lib.HostShare(ds, process_index=p, process_count=2, host_batch=4))
            for p in range(2)]
  assert shares == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
  assert list(records_lib.HostShare(ds, process_index=1, process_count=2, host_batch=4)[1::4]) == [5, 13]


# ------------------------------------------------------------------------ checkpointing


def test_state_round_trip_in_process(clip_tok, data_dir, mixed_tar):
  for cfg in (make_cfg(data_dir=data_dir), make_cfg(train=mixed_tar[0])):
    ds = data.build_train_dataset(cfg, global_batch_size=4, seed=3, tokenizer=clip_tok)
    it = iter(ds)
    take(it, 3)
    state = it.get_state()
    json.dumps(state)
    want = take(it, 4)
    it.set_state(state)  # same iterator, rewound
    assert_same_batches(take(it, 4), want)
    fresh = iter(ds)  # a new process would do this after a restart
    fresh.set_state(state)
    assert_same_batches(take(fresh, 4), want)


@pytest.mark.slow
def test_workers_count_bad_and_restore_state(clip_tok, mixed_tar):
  """mp_prefetch: bad counts survive the trip from workers; a fresh iterator restores.

  One test for both because every iterator starts 2 worker processes (seconds).
  """
  path, good, _ = mixed_tar
  cfg = make_cfg(train=path, shuffle=False, num_workers=2)
  ds = data.build_train_dataset(cfg, global_batch_size=2, seed=3, tokenizer=clip_tok)
  it, fresh = iter(ds), iter(ds)
  try:
    # Worker slices are [0::2] and [1::2]; batches alternate between them. 10 batches
    # are one epoch of each slice, 5 bad samples each.
    epoch = take(it, 10)
    assert sorted(k for b in epoch for k in b["_key"]) == good
    assert sum(b["_num_bad"] for b in epoch) == 10
    take(it, 3)
    state = it.get_state()
    json.dumps(state)
    want = take(it, 6)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 6), want)
  finally:
    it.close()
    fresh.close()
    del it, fresh
    gc.collect()


def test_orbax_checkpoint_round_trip(clip_tok, mixed_tar, tmp_path):
  ocp = importlib.import_module("orbax.checkpoint")
  cfg = make_cfg(train=mixed_tar[0])
  ds = data.build_train_dataset(cfg, global_batch_size=4, seed=5, tokenizer=clip_tok)
  it = iter(ds)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  want = take(it, 3)
  restored_it = iter(ds)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == 3
    restored = manager.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored_it)))
  assert restored["data"] is restored_it
  assert_same_batches(take(restored_it, 3), want)


# -------------------------------------------------------------------------------- eval


def test_iterate_eval_cifar_labels_and_padding(data_dir):
  batches = data.iterate_eval("cifar10/test-00001.tar", image_size=32, resize_size=32,
                              batch_size=640, data_dir=data_dir, with_labels=True)
  seen = list(batches)
  assert len(seen) == 8  # 5000 = 7 * 640 + 520
  for b in seen:
    assert b["image"].shape == (640, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["mask"].dtype == bool and b["label"].dtype == np.int32
  last = seen[-1]
  assert last["mask"].sum() == 520 and not last["mask"][520:].any()
  assert (last["image"][520:] == 0).all() and len(last["_key"]) == 520
  assert sum(b["mask"].sum() for b in seen) == 5000 and batches.num_bad == 0
  # Ordered: the tar order, class-interleaved (airplane, automobile, ...).
  assert list(seen[0]["_key"][:3]) == ["airplane_0500", "automobile_0500", "bird_0500"]
  np.testing.assert_array_equal(seen[0]["label"][:12], np.arange(12) % 10)
  # Deterministic: a second pass gives identical pixels.
  again = next(iter(data.iterate_eval("cifar10/test-00001.tar", image_size=32, resize_size=32,
                                      batch_size=640, data_dir=data_dir, with_labels=True)))
  np.testing.assert_array_equal(again["image"], seen[0]["image"])


def test_iterate_eval_names_its_split_in_the_log(data_dir, caplog):
  """A split passed as a grain dataset (a slice of a source) is named by its type and
  length in the end-of-pass line, not by Python's default repr."""
  caplog.set_level(logging.INFO)
  source = data.TarShardSource("cifar10/test-00001.tar", data_dir=data_dir)
  list(data.iterate_eval(grain.MapDataset.source(source)[:20], image_size=8, resize_size=8,
                         batch_size=16))
  list(data.iterate_eval(source, image_size=8, resize_size=8, batch_size=16, max_examples=20))
  lines = [r.getMessage() for r in caplog.records if "bad samples skipped" in r.getMessage()]
  assert lines[0].startswith("eval SliceMapDataset of 20 samples: 20 examples in 2 batches")
  assert lines[1].startswith("eval TarShardSource(patterns=['cifar10/test-00001.tar']")


def test_iterate_eval_captions_and_bad(mixed_tar):
  path, good, bad = mixed_tar
  batches = data.iterate_eval(path, image_size=16, resize_size=18, batch_size=8, with_captions=True)
  seen = list(batches)
  assert [len(b["_key"]) for b in seen] == [8, 8, 4]
  assert [k for b in seen for k in b["_key"]] == good
  assert batches.num_bad == len(bad) == sum(b["_num_bad"] for b in seen)
  assert seen[0]["captions"][0] == ["a photo number 0"]  # empty second caption dropped
  assert len(seen[-1]["captions"]) == 4 and seen[-1]["mask"].sum() == 4


def test_iterate_eval_flickr_val(data_dir):
  batches = data.iterate_eval(["flickr8k/val-00000.tar"], image_size=64, resize_size=64,
                              batch_size=256, data_dir=data_dir, with_captions=True)
  total = 0
  for b in batches:
    total += int(b["mask"].sum())
    assert all(len(c) == 5 for c in b["captions"])
  assert total == 1000 and batches.stats.num_batches == 4


def test_iterate_eval_from_config(data_dir):
  cfg = ml_collections.ConfigDict(dict(kind="tar", pattern="imagenet_sample/*.tar",
                                       data_dir=data_dir, image_key="jpg"))
  batches = data.iterate_eval(cfg, image_size=16, resize_size=16, batch_size=384, with_labels=True)
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  names = data.load_classnames("imagenet_sample", data_dir)
  assert len(names) == 1000 and names[0] == "tench"
  np.testing.assert_array_equal(np.sort(labels), np.arange(1000))  # one image per class


class _CaptionLength(grain.transforms.Map):
  """Stands in for a cached-embedding join: a per-record array computed from the record."""

  def map(self, record):
    if "_bad" in record:
      return record
    return {**record, "cap_len": np.int32(len(record["caption"])), "idx": np.int32(record["caption_index"])}


def test_extra_transforms_hook(mixed_tar, clip_tok):
  cfg = make_cfg(train=mixed_tar[0])
  ds = data.build_train_dataset(cfg, global_batch_size=4, seed=0, tokenizer=clip_tok,
                                extra_transforms=[_CaptionLength()], extra_keys=["cap_len"])
  batch = next(iter(ds))
  assert set(batch) == {"image", "text", "text_mask", "cap_len", "_key", "_num_bad"}
  assert batch["cap_len"].shape == (4,) and (batch["cap_len"] >= len("a photo number 0")).all()


def test_iterate_eval_max_examples(mixed_tar):
  path, _, _ = mixed_tar
  batches = data.iterate_eval(path, image_size=16, resize_size=16, batch_size=4, max_examples=10)
  keys = [k for b in batches for k in b["_key"]]
  # Captions are not read here, so only the two broken images among s000-s009 are bad.
  assert keys == [f"s{i:03d}" for i in range(10) if i not in (2, 5)] and batches.num_bad == 2


# ----------------------------------------------------------------- stream hook: packing

_PACKED_LEN, _PACKING_BINS = 48, 4


class _CaptionTokens(grain.transforms.Map):
  """A caption's real tokens (no padding), with the fields the packer carries along."""

  def map(self, record):
    length = int(record["text_mask"].sum())
    return {"tokens": record["text"][:length], "__key__": record["__key__"],
            "_num_bad": record["_num_bad"]}


def _pack_captions(ds):
  """What a method's InputExtras.stream would be: grain's first-fit packing."""
  return grain.experimental.FirstFitPackIterDataset(
      ds.map(_CaptionTokens()), length_struct={"tokens": _PACKED_LEN},
      num_packing_bins=_PACKING_BINS, seed=0, meta_features=("__key__", "_num_bad"))


def _unpacked(cfg, tok, n):
  """The first `n` records the packer sees: (key, tokens) and their bad counts."""
  it = iter(data.build_train_dataset(cfg, global_batch_size=1, seed=0, tokenizer=tok))
  samples, num_bad = [], 0
  for batch in take(it, n):
    length = int(batch["text_mask"][0].sum())
    samples.append((batch["_key"][0], tuple(batch["text"][0, :length])))
    num_bad += batch["_num_bad"]
  return samples, num_bad


def _segments(batches):
  """Every packed row split back into (key, tokens) by its segment ids and positions."""
  samples = []
  for batch in batches:
    assert set(batch) == {"tokens", "tokens_segment_ids", "tokens_positions", "_key", "_num_bad"}
    assert batch["tokens"].shape == batch["tokens_segment_ids"].shape == (_PACKING_BINS, _PACKED_LEN)
    for tokens, segment_ids, positions, keys in zip(batch["tokens"], batch["tokens_segment_ids"],
                                                    batch["tokens_positions"], batch["_key"]):
      num_segments = int(segment_ids.max())
      assert num_segments == len(keys) >= 1
      used = int((segment_ids > 0).sum())
      # Segments 1, 2, ... fill the row from the left, in order; the rest is padding.
      assert (segment_ids[used:] == 0).all() and (tokens[used:] == 0).all()
      assert (np.diff(segment_ids[:used]) >= 0).all()
      for segment, key in enumerate(keys, start=1):
        where = np.flatnonzero(segment_ids == segment)
        np.testing.assert_array_equal(positions[where], np.arange(len(where)))
        samples.append((key, tuple(tokens[where])))
  return samples


@pytest.mark.parametrize("source", ["flickr8k", "mixed"])
def test_stream_hook_packs_every_token_and_resumes(source, clip_tok, data_dir, mixed_tar, tmp_path):
  """Packing as a method's stream transform: nothing lost, rows well formed, state exact."""
  if source == "flickr8k":  # real captions; "mixed" adds bad samples to account for
    cfg = make_cfg(train=helpers.small_shard(data_dir, tmp_path), shuffle=True)
  else:
    cfg = make_cfg(train=mixed_tar[0], shuffle=False)
  ds = data.build_train_dataset(cfg, global_batch_size=_PACKING_BINS, seed=0,
                                tokenizer=clip_tok, stream=_pack_captions)
  it = iter(ds)
  batches = take(it, 3)
  # A batch of `num_packing_bins` rows is one first-fit round: together they hold exactly
  # the next records of the stream, whatever order the bins were shuffled into.
  packed = _segments(batches)
  want, want_bad = _unpacked(cfg, clip_tok, len(packed))
  assert sorted(packed) == sorted(want)
  assert sum(b["_num_bad"] for b in batches) == want_bad
  assert sum(len(tokens) for _, tokens in packed) == sum(
      int((b["tokens_segment_ids"] > 0).sum()) for b in batches)
  if source == "mixed":
    assert want_bad > 0
  # Resuming from a saved state gives the same packed batches, in this iterator and a new one.
  state = it.get_state()
  json.dumps(state)
  later = take(it, 2)
  fresh = iter(ds)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 2), later)
  it.set_state(state)
  assert_same_batches(take(it, 2), later)


# ------------------------------------------------------------ img2dataset's shard layout


def _img2dataset_shard(path, captions):
  """A shard as img2dataset writes it: `<9-digit key>.jpg`, `.txt` (the caption), `.json`
  (metadata only: url, key, status, sizes), in its order, GNU tar format."""
  with tarfile.open(path, "w") as tf:
    for i, caption in enumerate(captions):
      key = f"{i:09d}"
      meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success",
              "error_message": None, "width": 20, "height": 24, "original_width": 640,
              "original_height": 480, "exif": "{}", "sha256": "0" * 64}
      for ext, payload in (("jpg", _jpeg(i)), ("txt", caption.encode()),
                           ("json", json.dumps(meta).encode())):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))


def test_img2dataset_shards_train_and_evaluate_as_they_are(tmp_path, clip_tok):
  """The caption comes from `.txt` when `.json` has no caption field; none is bad."""
  captions = [f"a photo of thing {i}" for i in range(6)] + ["", "the last one"]
  _img2dataset_shard(tmp_path / "00000.tar", captions)
  cfg = make_cfg(train=str(tmp_path / "*.tar"), shuffle=False, flip=False)
  batch = next(iter(data.build_train_dataset(cfg, global_batch_size=7, seed=0, tokenizer=clip_tok)))
  assert batch["_num_bad"] == 1  # only the empty caption
  assert list(batch["_key"]) == [f"{i:09d}" for i in (0, 1, 2, 3, 4, 5, 7)]
  want_ids, _ = clip_tok.encode_batch([c for c in captions if c], 16)
  np.testing.assert_array_equal(batch["text"], want_ids)
  evals = list(data.iterate_eval(str(tmp_path / "*.tar"), image_size=16, resize_size=18,
                                 batch_size=8, with_captions=True))
  assert [c for b in evals for c in b["captions"]][:2] == [[captions[0]], [captions[1]]]
  # With neither a caption field nor a .txt, the reason names the field and what is there.
  record = {"__key__": "k", "json": json.dumps({"url": "u", "key": "k"}).encode()}
  parsed = data.ParseCaption("captions", pick="first").map(record)
  assert "no field 'captions'" in parsed["_bad"] and "['key', 'url']" in parsed["_bad"]
