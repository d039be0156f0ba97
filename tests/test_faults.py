"""Fault injection: what vlpre does when things break (README "Failure behaviour").

Data section: real CIFAR-10 samples copied into small shards, then damaged the ways
storage damages them (a copy cut off, a header overwritten, bytes inserted, a file that
cannot be opened or read). Each damaged sample must come out as a counted bad record,
every intact one must decode, training input must go on, and past
`input.max_bad_fraction` the run must stop with data.BadSampleGuard's one line.

Run section: the real trainer stopped (SIGTERM) or killed (kill -9) in each phase of its
loop (a step, an evaluator, a checkpoint write), fed a NaN batch, or denied disk space,
then resumed; see the section's own comment. This file doubles as the fault-injecting
entry point its subprocess tests start: `python -m tests.test_faults FAULT --config=...`.
"""
import errno
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zlib

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
from tensorboardX import record_writer

from vlpre import check
from vlpre import checkpoint as checkpoint_lib
from vlpre import config_lib
from vlpre import data
from vlpre import evaluators
from vlpre import metrics
from vlpre import storage
from vlpre import train
from vlpre import train_state
from vlpre.data import convert
from vlpre.data import documents
from vlpre.data import interleaved
from vlpre.data import records
from vlpre.data import sources
from vlpre.data import tar_index
from vlpre.data import tar_scan
from vlpre.data import transforms as T
from vlpre.evaluators import sugarcrepe
from vlpre.llm import assets
from vlpre.llm import checkpoints
from vlpre.text_encoders import store as store_lib

from tests import helpers

NUM_SAMPLES = 12  # 2 members each (.png, .cls); ~2.5 KB a sample


# ----------------------------------------------------------------------------- data


@pytest.fixture
def shard(data_dir, tmp_path):
  """(path, keys, members) of a fresh 12-sample CIFAR-10 shard; members: name → (header, data) offsets."""
  path = helpers.small_shard(data_dir, tmp_path, "cifar10/train-00000.tar", NUM_SAMPLES)
  with tarfile.open(path) as tf:
    infos = list(tf)
  members = {i.name: (i.offset, i.offset_data) for i in infos}
  keys = list(dict.fromkeys(i.name.split(".")[0] for i in infos))
  assert len(keys) == NUM_SAMPLES
  return path, keys, members


def _records(path):
  src = sources.TarShardSource(path)
  return [src[i] for i in range(len(src))]


def _decoded(record):
  """The record through the label pipeline's decoders (bad ones stay bad)."""
  return T.ParseLabel().map(T.DecodeImage(("png",)).map(record))


def _check(records, good_keys, num_bad, reason):
  """Good keys decode in order; exactly `num_bad` records are bad, one naming `reason`."""
  decoded = [_decoded(r) for r in records]
  good = [r for r in decoded if not T.is_bad(r)]
  bad = [r for r in decoded if T.is_bad(r)]
  assert [r["__key__"] for r in good] == good_keys
  assert all(r["image"].shape == (32, 32, 3) for r in good)
  assert len(bad) == num_bad, [r[T.BAD] for r in bad]
  assert any(reason in r[T.BAD] for r in bad), [r[T.BAD] for r in bad]


def _cut(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


def _rewrite_size(path, header, field):
  """Writes `field` (12 bytes) into the size field of the header at `header`, checksum fixed."""
  with open(path, "r+b") as f:
    f.seek(header)
    block = bytearray(f.read(512))
    block[124:136] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    f.seek(header)
    f.write(block)


@pytest.mark.parametrize("where", ["mid_data", "after_header", "mid_header"])
def test_truncated_shard_keeps_whole_samples(shard, where):
  """An interrupted copy: the cut sample is one bad record, the whole ones before it decode."""
  path, keys, members = shard
  header, data_start = members[f"{keys[7]}.png"]
  _cut(path, {"mid_data": data_start + 300, "after_header": data_start,
              "mid_header": header + 100}[where])
  reason = "inside a tar header" if where == "mid_header" else "cut off"
  _check(_records(path), keys[:7], 1, reason)
  if where != "mid_header":  # the cut member's key names the bad record
    assert _records(path)[-1]["__key__"] == keys[7]


def test_member_past_end_of_file(shard):
  """A header whose size runs past EOF (here: the first member of sample 5 claims 1 MB)."""
  path, keys, members = shard
  _rewrite_size(path, members[f"{keys[5]}.png"][0], b"%011o\0" % (1 << 20))
  # The next header is found after the claimed size fails: only sample 5 is lost.
  _check(_records(path), keys[:5] + keys[6:], 1, "corrupt size field")


def test_cut_between_members_is_a_partial_sample(shard):
  """Cut after a .png, before its .cls: whole members, so the sample fails at decode."""
  path, keys, members = shard
  _cut(path, members[f"{keys[4]}.cls"][0])
  _check(_records(path), keys[:4], 1, "cls")


@pytest.mark.parametrize("damage", ["garbage_block", "zeroed_block", "checksum", "inserted_bytes"])
def test_bad_header_resumes_at_next_header(shard, damage):
  """A broken header costs its sample; the scan finds the next header and goes on."""
  path, keys, members = shard
  header, _ = members[f"{keys[5]}.png"]
  with open(path, "r+b") as f:
    content = bytearray(f.read())
    if damage == "garbage_block":
      content[header:header + 512] = bytes(range(256)) * 2
    elif damage == "zeroed_block":  # reads as end-of-archive, but data follows
      content[header:header + 512] = bytes(512)
    elif damage == "checksum":
      content[header] ^= 0x01  # one flipped bit in the name
    else:  # 100 stray bytes: every later header is off the 512-byte grid
      content[header:header] = b"\x7f" * 100
    f.seek(0)
    f.write(content)
  records = _records(path)
  if damage == "inserted_bytes":  # 100 bytes skipped; every sample is intact
    _check(records, keys, 1, "bad tar header")
  else:  # sample 5 loses its image: one bad record for the skipped bytes, and its .cls alone
    _check(records, keys[:5] + keys[6:], 2, "bad tar header")


@pytest.mark.parametrize("damage", ["cut", "garbage_block"])
def test_pax_shards_take_the_tarfile_path_with_the_same_faults(shard, tmp_path, damage):
  """Long names need pax headers, which the fast scanner leaves to `tarfile`."""
  path, keys, _ = shard
  pax = str(tmp_path / "pax-00000.tar")
  prefix = "d" * 120 + "/"
  with tarfile.open(path) as src, tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as dst:
    for info in src:
      data = src.extractfile(info)
      info.name = prefix + info.name
      dst.addfile(info, data)
  with tarfile.open(pax) as tf:
    offsets = {i.name: (i.offset, i.offset_data) for i in tf}
  header, data_start = offsets[f"{prefix}{keys[7]}.png"]
  if damage == "cut":
    _cut(pax, data_start + 300)
  else:  # tarfile stops at the garbage without a word: the rest is counted as lost
    with open(pax, "r+b") as f:
      f.seek(header)
      f.write(b"\xff" * 512)
  src = sources.TarShardSource(pax)
  records = [_decoded(src[i]) for i in range(len(src))]
  assert [r["__key__"] for r in records if not T.is_bad(r)] == [prefix + k for k in keys[:7]]
  bad = [r[T.BAD] for r in records if T.is_bad(r)]
  assert ("cut off" if damage == "cut" else "unreadable tar data") in bad[0]
  assert len(bad) == 1 if damage == "cut" else 4 <= len(bad) <= 7  # samples 7..11, estimated


def test_not_a_tar_at_all(shard, tmp_path):
  """A stray non-tar file among the shards: its bytes are bad records, the rest reads."""
  path, keys, _ = shard
  junk = tmp_path / "junk-00001.tar"
  junk.write_bytes(b"not a tar file\n" * 400)
  src = sources.TarShardSource(str(tmp_path / "*.tar"))
  records = [src[i] for i in range(len(src))]
  assert [r["__key__"] for r in records if not T.is_bad(r)] == keys
  assert sum(T.is_bad(r) for r in records) >= 1


def test_unreadable_shard_counts_its_samples(shard, tmp_path, monkeypatch):
  """Permission denied while indexing: about its samples' worth of bad records."""
  path, keys, _ = shard
  other = tmp_path / "other-00001.tar"
  other.write_bytes(open(path, "rb").read())
  real_open = tar_scan.open_shard

  def denied(p):
    if p == str(other):
      raise PermissionError(13, "Permission denied", p)
    return real_open(p)

  monkeypatch.setattr(tar_scan, "open_shard", denied)  # root ignores chmod 000
  src = sources.TarShardSource(str(tmp_path / "*.tar"))
  records = [src[i] for i in range(len(src))]
  bad = [r for r in records if T.is_bad(r)]
  assert [r["__key__"] for r in records if not T.is_bad(r)] == keys
  assert abs(len(bad) - NUM_SAMPLES) <= 2 and "Permission denied" in bad[0][T.BAD]


def test_no_readable_sample_is_a_clear_error(shard, monkeypatch):
  path, _, _ = shard
  monkeypatch.setattr(tar_scan, "open_shard", lambda p: (_ for _ in ()).throw(
      PermissionError(13, "Permission denied", p)))
  with pytest.raises(FileNotFoundError, match="no readable sample.*Permission denied"):
    sources.TarShardSource(path)


@pytest.mark.parametrize("fault", ["deleted", "cut", "io_error"])
def test_faults_after_indexing_are_bad_records(shard, tmp_path, monkeypatch, fault):
  """The shard changes under a running job: reads become bad records, not exceptions."""
  path, keys, members = shard
  src = sources.TarShardSource(path)
  assert not T.is_bad(src[0])  # a descriptor of the intact file is cached now...
  src._fd_cache().forget(path)  # ...and dropped, as after an eviction or in a new worker
  if fault == "deleted":
    os.remove(path)
  elif fault == "cut":
    _cut(path, members[f"{keys[6]}.png"][1] + 10)
  else:  # every read fails with EISDIR: an open descriptor that cannot be read
    monkeypatch.setattr(tar_scan, "open_shard", lambda p: os.open(str(tmp_path), os.O_RDONLY))
  records = [src[i] for i in range(len(src))]
  bad = [i for i, r in enumerate(records) if T.is_bad(r)]
  assert bad == (list(range(6, NUM_SAMPLES)) if fault == "cut" else list(range(NUM_SAMPLES)))
  assert "cannot read sample" in records[bad[0]][T.BAD]


def _train_cfg(path, max_bad_fraction):
  return ml_collections.ConfigDict(dict(
      data_dir=None, train=path, kind="tar", label=True, image_key="png", image_size=24,
      resize_size=32, augment="resize_random_crop", flip=False, num_workers=0,
      prefetch_buffer_size=0, shuffle=True, max_bad_fraction=max_bad_fraction))


def _damaged(shard):
  """The shard with sample 3's header garbled and cut inside sample 9: 8 good samples."""
  path, keys, members = shard
  with open(path, "r+b") as f:
    f.seek(members[f"{keys[3]}.png"][0])
    f.write(b"\xff" * 512)
  _cut(path, members[f"{keys[9]}.png"][1] + 100)
  return path, keys[:3] + keys[4:9]


def test_training_input_goes_on_and_counts(shard):
  path, good = _damaged(shard)
  cfg = _train_cfg(path, 0.5)
  it = iter(data.build_train_dataset(cfg, global_batch_size=4, seed=0, tokenizer=None))
  guard = data.BadSampleGuard(cfg.max_bad_fraction)
  batches = [next(it) for _ in range(8)]  # 4 epochs of the 8 good samples
  for batch in batches:
    guard.update(batch["_num_bad"], 4)
  assert sorted(k for b in batches[:2] for k in b["_key"]) == sorted(good)
  per_epoch = sum(b["_num_bad"] for b in batches) / 4
  assert 2 <= per_epoch <= 4  # the garbled header (+ its .cls-only remnant) and the cut sample
  assert 0.2 < guard.fraction < 0.34


def test_past_max_bad_fraction_fails_with_one_line(shard):
  path, _ = _damaged(shard)
  cfg = _train_cfg(path, 0.01)
  it = iter(data.build_train_dataset(cfg, global_batch_size=4, seed=0, tokenizer=None))
  guard = data.BadSampleGuard(cfg.max_bad_fraction)  # as train.run builds it
  with pytest.raises(RuntimeError) as err:
    for _ in range(200):
      guard.update(next(it)["_num_bad"], 4)
  message = str(err.value)
  assert "\n" not in message and "input.max_bad_fraction=0.01" in message
  assert guard.bad + guard.good >= guard.min_samples


# ---------------------------------------------------------- crafted and silently wrong data


def _within(seconds, fn, *args):
  """fn(*args) in a daemon thread: a hang fails the test instead of the whole suite. The
  bound is generous (a correct scan of these shards takes milliseconds)."""
  out = []
  thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"{fn.__name__} still running after {seconds} s: an endless loop"
  assert out, f"{fn.__name__} raised (see the thread's traceback above)"
  return out[0]


_SIZE_FIELDS = {
    "negative": b"-0000001000\0",  # int(x, 8) reads -512: a scan stepping backwards
    "negative_base256": b"\xff" + (-2048 % (1 << 88)).to_bytes(11, "big"),  # GNU: tarfile path
    "absurd": b"77777777777\0",  # 8 GiB, far past the end of the file
}


@pytest.mark.parametrize("size_field", list(_SIZE_FIELDS))
def test_crafted_size_field_is_a_damaged_shard_not_a_hang(shard, size_field):
  """A header with a negative or absurd size and a valid checksum: counted as damage, the
  scan goes on (a negative size once made it loop forever, `--check` too)."""
  path, keys, members = shard
  _rewrite_size(path, members[f"{keys[5]}.png"][0], _SIZE_FIELDS[size_field])
  records = _within(10, _records, path)
  if size_field == "negative":  # a bad header: the scan resumes at the next one
    _check(records, keys[:5] + keys[6:], 2, "negative size field")
  elif size_field == "absurd":  # a corrupt size: the next valid header follows
    _check(records, keys[:5] + keys[6:], 1, "corrupt size field")
  else:  # tarfile stops at it: the rest of the shard is lost and counted
    decoded = [_decoded(r) for r in records]
    assert [r["__key__"] for r in decoded if not T.is_bad(r)] == keys[:5]
    bad = [r[T.BAD] for r in decoded if T.is_bad(r)]
    assert 4 <= len(bad) <= 8 and "negative size field" in bad[0]  # samples 5..11, estimated
  members_found, faults = _within(10, tar_scan.scan, path)  # what `--check` reads
  assert faults and len(members_found) >= 10


def test_check_returns_on_a_crafted_size_field(shard, data_dir):
  path, keys, members = shard
  _rewrite_size(path, members[f"{keys[0]}.png"][0], _SIZE_FIELDS["negative"])
  config = helpers.tiny_clip_config(data_dir)
  config.input.train = path
  # It returns (never a hang). This CIFAR shard has no captions, so the one-record decode
  # check reports it, naming the damaged header it stepped over on the way.
  problems = _within(30, check.check_config, config)
  assert all(p.startswith("input.train:") for p in problems), problems
  assert all("negative size field" in p for p in problems), problems


def _relabelled_shard(shard, tmp_path, labels):
  """A copy of the CIFAR shard whose samples' .cls members say `labels[key]` where given."""
  path, keys, _ = shard
  out = str(tmp_path / "relabelled-00000.tar")
  with tarfile.open(path) as src, tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as dst:
    for info in src:
      payload = src.extractfile(info).read()
      key, ext = info.name.split(".", 1)
      if ext == "cls" and key in labels:
        payload = labels[key].encode()
        info.size = len(payload)
      dst.addfile(info, io.BytesIO(payload))
  return out


def test_out_of_range_labels_are_counted_bad_records(shard, tmp_path):
  """A 1-based label past the class count, or -1, is a bad record, never an all-zero target."""
  _, keys, _ = shard
  path = _relabelled_shard(shard, tmp_path, {keys[2]: "10", keys[7]: "-1"})
  cfg = _train_cfg(path, 0.5)
  cfg.num_classes = 10
  it = iter(data.build_train_dataset(cfg, global_batch_size=5, seed=0, tokenizer=None))
  batches = [next(it) for _ in range(4)]  # 2 epochs of the 10 good samples
  assert sum(b["_num_bad"] for b in batches) == 4  # 2 per epoch
  seen = [k for b in batches for k in b["_key"]]
  assert keys[2] not in seen and keys[7] not in seen and len(set(seen)) == 10
  assert all(0 <= label < 10 for b in batches for label in b["label"])
  parse = T.ParseLabel(num_classes=10)
  reasons = [parse.map({"__key__": "k", "cls": value}).get(T.BAD) for value in (b"10", b"-1", b"9")]
  assert "label 10 is out of range of 10 classes" in reasons[0]
  assert "label -1 is out of range" in reasons[1] and reasons[2] is None
  assert T.is_bad(T.ParseLabel().map({"__key__": "k", "cls": b"-1"}))  # no class count: still


def test_member_extensions_take_any_count(tmp_path, monkeypatch):
  """40,000 distinct extensions (past an int16) index and read back by their own name."""
  path = tmp_path / "many-00000.tar"
  path.write_bytes(b"x" * 1024)
  count = 40_000
  members = [(f"s{i}.e{i}", 0, 1, 1024) for i in range(count)]  # every member: byte 0
  monkeypatch.setattr(tar_scan, "scan", lambda p: (members, []))
  index = tar_index.ShardIndex([str(path)])
  assert len(index) == count and len(index.exts) == count
  for i in (0, 32_767, 32_768, count - 1):
    assert index.exts[index.member_ext[index.sample_start[i]]] == f"e{i}"
  record = sources.TarShardSource(str(path))[count - 1]
  assert record == {"__key__": f"s{count - 1}", f"e{count - 1}": b"x"}


def _tar(path, members):
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
    for name, payload in members:
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tf.addfile(info, io.BytesIO(payload))


def test_image_references_resolve_by_full_key_and_collisions_are_refused(tmp_path):
  """`a/cat.jpg`, `cat.v2.jpg` and `cat.jpg` are three images; two members with one key
  (`x/cat.jpg`, `x/cat.png`) make the store refuse, in one line."""
  _tar(tmp_path / "images-00000.tar", [("a/cat.jpg", b"A"), ("a/cat.json", b"{}"),
                                       ("cat.v2.jpg", b"B"), ("cat.jpg", b"C")])
  store = documents.ImageStore(str(tmp_path / "images-*.tar"))
  elements, _ = documents.read_document(
      {"texts": [None, None, None, "t"], "images": ["a/cat.jpg", "cat.v2.jpg", "cat.jpg", None]})
  got = [store.get(e[1]) for e in elements if e[0] == documents.IMAGE]
  assert [(r["__key__"], r["jpg"]) for r in got] == [
      ("a/cat", b"A"), ("cat.v2", b"B"), ("cat", b"C")]
  assert len(store) == 3 and store.get("a/cat.v2") is None
  _tar(tmp_path / "clash-00000.tar", [("x/cat.jpg", b"A"), ("x/cat.png", b"B")])
  with pytest.raises(ValueError) as err:
    documents.ImageStore(str(tmp_path / "clash-*.tar"))
  assert "\n" not in str(err.value)
  assert "'x/cat' ('x/cat.jpg' in clash-00000.tar, 'x/cat.png' in clash-00000.tar)" in (
      str(err.value))


@pytest.mark.parametrize("doc", [
    {"texts": [5, None], "images": [None, "a.jpg"]},            # OBELICS: a number
    {"texts": [{"t": "x"}], "images": [None]},                  # OBELICS: an object
    {"text_list": ["fine", None], "image_info": []},            # MMC4: a null sentence
    {"text_list": "not a list", "image_info": []},
    {"texts": [None], "images": [7]},                           # an image reference
    {"text_list": ["s"], "image_info": [{"image_name": 3, "matched_text_index": 0}]},
])
def test_non_string_text_in_a_document_is_a_bad_record(doc):
  record = interleaved.ParseDocument().map({"__key__": "docs:0", "json": json.dumps(doc).encode()})
  assert T.is_bad(record) and record[T.BAD].startswith("'docs:0': bad document: TypeError: ")
  assert "\n" not in record[T.BAD]


def test_embed_store_settings_are_written_first_and_checked_on_resume(data_dir, shard, tmp_path,
                                                                        monkeypatch):
  """An interrupted store says what began it; a rerun with other encoder settings refuses
  in one line before embedding anything, instead of adding shards of another encoder."""
  path, _, _ = shard
  config = helpers.tiny_clip_config(data_dir)
  config.input.train = path
  config.text_encoder = dict(name="minilm-l6", max_len=16, pooling="", normalize=True,
                             template="{text}", layer=-1)
  config.text_cache = str(tmp_path / "store")

  class Killed(Exception):
    """Stands for a kill while the encoder loads."""

  def interrupted(_):
    raise Killed
  monkeypatch.setattr(store_lib, "text_encoder", interrupted)
  with pytest.raises(Killed):
    store_lib.build_store(config, progress=False, shard_size=4)
  meta = json.loads((tmp_path / "store" / "meta.json").read_text())
  assert meta == {"settings": store_lib.encoder_settings(config), "shard_size": 4,
                  "num_samples": NUM_SAMPLES, "complete": False}
  config.text_encoder.max_len = 32
  with pytest.raises(ValueError) as err:  # refused before the encoder would load
    store_lib.build_store(config, progress=False, shard_size=4)
  assert "\n" not in str(err.value) and "max_len: 16 -> 32" in str(err.value)
  config.text_encoder.max_len = 16
  with pytest.raises(ValueError, match="shard_size: 4 -> 8"):
    store_lib.build_store(config, progress=False, shard_size=8)
  with pytest.raises(Killed):  # the settings it began with: resumes (up to the encoder)
    store_lib.build_store(config, progress=False, shard_size=4)
  (tmp_path / "store" / "meta.json").unlink()  # shards of unknown settings are refused too
  (tmp_path / "store" / "emb-00000.npy").write_bytes(b"")
  with pytest.raises(ValueError, match="no meta.json"):
    store_lib.build_store(config, progress=False, shard_size=4)


def test_hub_revision_must_be_a_commit_hash():
  config = config_lib.load(os.path.join(ROOT, "configs", "lift.py") + ":tiny")
  config.text_encoder.update(name="HuggingFaceTB/SmolLM2-360M", allow_download=True)
  for revision in ("main", "v1.0", "a" * 39, "A" * 40):
    config.text_encoder.revision = revision
    problems = check.check_config(config)
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert f"text_encoder.revision={revision!r} is not a commit hash" in problems[0]
  config.text_encoder.revision = "0123456789abcdef" * 2 + "01234567"
  assert check.check_config(config) == []
  with pytest.raises(assets.HubDownloadRefused, match="not a commit hash"):
    assets.resolve("HuggingFaceTB/SmolLM2-360M", allow_download=True, revision="main")


@pytest.mark.parametrize("name", ["../outside.jpg", "a/../../outside.jpg", "/etc/passwd"])
def test_names_read_from_data_stay_inside_their_folder(tmp_path, name):
  """SugarCrepe's image names, the converter's caption list and a sharded-safetensors
  index name files; one that leaves its folder is refused in one line, never read."""
  folder = tmp_path / "in"
  folder.mkdir()
  (tmp_path / "outside.jpg").write_bytes(b"secret")
  lines = []
  with pytest.raises(ValueError) as err:
    sugarcrepe.ImageFiles(str(folder), ["fine.jpg", name])
  lines.append(str(err.value))
  captions = tmp_path / "captions.jsonl"
  captions.write_text(json.dumps({"filename": name, "caption": "a cat"}) + "\n")
  with pytest.raises(ValueError) as err:
    convert.convert_captions(str(folder), str(captions), str(tmp_path / "out"))
  lines.append(str(err.value))
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
  with pytest.raises(ValueError) as err:
    checkpoints.read_hf_weights(folder)
  lines.append(str(err.value))
  for line in lines:
    assert "\n" not in line and f"{name!r} is not a relative path inside {folder}" in line
  inside = storage.join_inside(str(folder), "a/../b.jpg", what="x")  # '..' within: fine
  assert inside == os.path.join(folder, "a/../b.jpg")


def _png_declaring(width, height):
  """A 1x1 PNG whose header says width x height (nothing beyond the header is decoded)."""
  buf = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buf, "PNG")
  png = bytearray(buf.getvalue())
  png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR's width, height
  png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
  return bytes(png)


def test_image_pixel_limit_follows_the_image_size(monkeypatch):
  """PIL's decompression-bomb limit, derived from the config's image size: an image
  declaring more pixels is a bad record before anything is decoded."""
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
  assert T.max_image_pixels(32) == T.max_image_pixels(256) == 2**26
  assert T.max_image_pixels(512) == (32 * 512) ** 2
  decode = records.decode_image({"image_size": 32})
  assert decode.max_pixels == 2**26
  bomb = decode.map({"__key__": "k", "png": _png_declaring(9_000, 9_000)})  # 81 M > 2**26
  assert "declares 9000x9000 pixels, over the limit of 67108864" in bomb[T.BAD]
  huge = decode.map({"__key__": "k", "png": _png_declaring(100_000, 100_000)})  # 10**10
  assert T.is_bad(huge) and "\n" not in huge[T.BAD]  # refused by PIL's check in `open` (2x its limit)
  assert "declares more pixels than the limit of 67108864" in huge[T.BAD]
  fine = decode.map({"__key__": "k", "png": _png_declaring(1, 1)})
  assert fine["image"].shape == (1, 1, 3)
  wide = records.decode_image({"image_size": 512})
  assert wide.max_pixels == (32 * 512) ** 2
  wide.map({"__key__": "k", "png": _png_declaring(1, 1)})  # decoding raises PIL's own limit
  assert Image.MAX_IMAGE_PIXELS == wide.max_pixels  # so PIL never refuses what it accepts


# ----------------------------------------------------------------------------- runs
#
# Every scenario trains the same tiny CLIP for 6 steps (checkpoints at 2, 4 and 6, and
# orbax's first one at 1; two small retrieval evaluators every 2 steps and at the end)
# and is compared with one uninterrupted run: a resumed run must log bit-identical
# losses. In-process tests stop the loop through its real SIGTERM handler; the
# subprocess tests run `python -m vlpre.main` and kill it, sharing a persistent XLA
# compilation cache so that only the first process compiles.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 6


def fault_config(data_dir, *, evals=True, staged=False):
  """tests.helpers' tiny CLIP, checkpointed every 2 steps; `staged`: two stages, no evals."""
  c = helpers.tiny_clip_config(data_dir, total_steps=TOTAL_STEPS)
  c.checkpoint.every_steps = 2
  retrieval = dict(c.evals.retrieval, max_examples=16, batch_size=16, every_steps=2)
  c.evals = dict(retrieval_a=retrieval, retrieval_b=retrieval) if evals and not staged else {}
  if staged:  # stage "a" compiles the same step as the unstaged config
    c.stages = (dict(name="a", steps=TOTAL_STEPS), dict(name="b", steps=2))
  return c


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """A persistent compilation cache for this module's runs of one model: each compiles once.

  Subprocesses get it through their environment (`main_env`).
  """
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("xla_cache"))
  options = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0,
             "jax_persistent_cache_min_entry_size_bytes": 0}
  saved = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield path
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def straight_losses(data_dir, tmp_path_factory, xla_cache):
  """Per-step losses of the uninterrupted run (evaluators do not change them)."""
  del xla_cache  # requested for its side effect
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.run(fault_config(data_dir, evals=False), workdir)
  return _losses(workdir)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def _evaluated(workdir):
  """{step: names of the evaluators with results at that step}."""
  return {r["step"]: sorted({k.split("/")[0] for k in r if k.startswith("retrieval_")})
          for r in metrics.read_metrics(workdir)}


def _checkpoints(workdir):
  """(complete steps, steps whose write was cut off): orbax renames a step when it is whole."""
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return (sorted(int(n) for n in names if n.isdigit()),
          sorted(int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n))


class _CallOnWait:
  """An orbax commit future whose `result` (awaited in the background write) calls `fn`."""

  def __init__(self, fn):
    self.fn = fn

  def result(self, timeout=None):
    del timeout
    return self.fn()


def _step_of(directory, item):
  match = re.search(rf"/(\d+)\.orbax-checkpoint-tmp[^/]*/{item}", str(directory))
  return int(match.group(1)) if match else None


def _hook_state_writes(patch, fn, item="state"):
  """Calls fn(step) inside the background part of every checkpoint's `item` write (the
  state's arrays, or the counters' JSON).

  That is where a full disk or a slow bucket shows up: the step's directory exists, its
  arrays are being written, and it is not complete until `fn` returns.
  """
  handler = {"state": ocp.StandardCheckpointHandler, "counters": ocp.JsonCheckpointHandler}[item]
  real = handler.async_save

  async def async_save(self, directory, *args, **kwargs):
    futures = list(await real(self, directory, *args, **kwargs) or [])
    step = _step_of(directory, item)
    if step is not None:
      futures.append(_CallOnWait(lambda: fn(step)))
    return futures

  patch.setattr(handler, "async_save", async_save)


def _hook_data_item_writes(patch, fn):
  """Calls fn(step) before each checkpoint's input-position item is written (grain's
  handler writes it in the caller's thread)."""
  real = grain.checkpoint.CheckpointHandler.save

  def save(self, directory, *args, **kwargs):
    step = _step_of(directory, "data")
    if step is not None:
      fn(step)
    return real(self, directory, *args, **kwargs)

  patch.setattr(grain.checkpoint.CheckpointHandler, "save", save)


def _sigterm():
  os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.integration
def test_sigterm_in_an_evaluator_then_in_a_save(data_dir, tmp_path, monkeypatch, straight_losses):
  """SIGTERM during step 2's first evaluator, then (resumed) during step 4's checkpoint write.

  Each time the last finished step is saved complete before `run` returns with
  stop_requested(), the evaluators the stop cut off run on resume, and the losses equal
  the uninterrupted run's.
  """
  config, workdir = fault_config(data_dir), str(tmp_path)
  real_eval = evaluators.Scheduled.run

  def eval_then_sigterm(self, variables):
    _sigterm()  # the evaluator still finishes; the next one is skipped
    return real_eval(self, variables)

  monkeypatch.setattr(evaluators.Scheduled, "run", eval_then_sigterm)
  train.run(config, workdir)
  assert train.stop_requested()
  assert _checkpoints(workdir) == ([1, 2], [])
  assert _evaluated(workdir)[2] == ["retrieval_a"] and max(_evaluated(workdir)) == 2

  monkeypatch.setattr(evaluators.Scheduled, "run", real_eval)
  _hook_state_writes(monkeypatch, lambda step: step == 4 and _sigterm())
  train.run(config, workdir)  # the write is async: steps 5 and 6 may finish meanwhile
  assert train.stop_requested()
  complete, cut_off = _checkpoints(workdir)
  assert 4 in complete and complete[-1] == max(_losses(workdir)) and not cut_off
  assert _evaluated(workdir)[2] == ["retrieval_a", "retrieval_b"]  # rerun on resume

  monkeypatch.undo()
  final = train.run(config, workdir)
  assert not train.stop_requested() and "retrieval_b/i2t_R@1" in final
  assert _losses(workdir) == straight_losses
  assert all(_evaluated(workdir)[step] == ["retrieval_a", "retrieval_b"] for step in (2, 4, 6))


@pytest.mark.integration
def test_nan_in_a_batch_stops_with_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch,
                                                             straight_losses):
  """A NaN image in step 3's batch: FloatingPointError, checkpoint 2 intact, nothing NaN logged.

  (tests/test_train.py poisons the update instead: a NaN learning rate.)
  """
  workdir = str(tmp_path)
  _nan_in_batch(monkeypatch, 3)
  with pytest.raises(FloatingPointError, match=r"at step 3.*checkpoint \(step 2\).*intact"):
    train.run(fault_config(data_dir, evals=False), workdir)
  assert _checkpoints(workdir) == ([1, 2], [])
  assert _losses(workdir) == {s: straight_losses[s] for s in (1, 2)}


@pytest.mark.integration
@pytest.mark.parametrize("item", ["state", "data", "counters"])
def test_full_disk_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch, straight_losses,
                                                 item):
  """Step 4's write of the state's arrays or the input-position item fails with ENOSPC, or
  its counters item with EIO: one clear line; checkpoint 2 intact, and the resume from it
  logs the uninterrupted run's losses."""
  config, workdir = fault_config(data_dir, evals=False), str(tmp_path)

  def disk_full(step):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")

  def io_error(step):
    if step == 4:
      raise OSError(errno.EIO, "Input/output error")

  if item == "data":  # grain's item is written in the caller's thread
    _hook_data_item_writes(monkeypatch, disk_full)
  else:  # the async writes' failure surfaces at the next save (6)
    _hook_state_writes(monkeypatch, disk_full if item == "state" else io_error, item=item)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as error:
    train.run(config, workdir)
  message = str(error.value)
  code, text = ((errno.EIO, "Input/output error") if item == "counters" else
                (errno.ENOSPC, "No space left on device"))
  assert "\n" not in message and error.value.errno == code
  assert "step 4 could not be written" in message and text in message
  assert "last complete checkpoint, step 2, is intact" in message
  assert _checkpoints(workdir) == ([1, 2], [4])

  monkeypatch.undo()
  train.run(config, workdir)
  assert _checkpoints(workdir)[0][-1] == TOTAL_STEPS
  assert _losses(workdir) == straight_losses


@pytest.mark.integration
@pytest.mark.parametrize("where", ["metrics.jsonl", "tensorboard"])
def test_full_disk_in_the_metrics_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch,
                                                        straight_losses, where):
  """ENOSPC in metrics.jsonl (EIO in TensorBoard) from step 3: MetricsWriteError, one line;
  checkpoint 2 intact; the rerun resumes from it with the uninterrupted run's losses."""
  config, workdir = fault_config(data_dir, evals=False), str(tmp_path)
  _metrics_fail_from(monkeypatch, 3, where)
  with pytest.raises(metrics.MetricsWriteError) as error:
    train.run(config, workdir)
  assert "\n" not in str(error.value) and "of step 3 could not be written" in str(error.value)
  assert _checkpoints(workdir) == ([1, 2], [])

  monkeypatch.undo()
  train.run(config, workdir)
  assert _losses(workdir) == straight_losses


@pytest.mark.integration
def test_keep_1_never_leaves_no_complete_checkpoint(data_dir, tmp_path, monkeypatch,
                                                     straight_losses):
  """checkpoint.keep=1: while each step is written the previous one is still whole (orbax
  deletes it after the commit); a failed write (ENOSPC at step 4) leaves step 2, which
  the rerun resumes from after removing the unfinished step 4, with the same losses."""
  config, workdir = fault_config(data_dir, evals=False), str(tmp_path)
  config.checkpoint.keep = 1
  during, failed = {}, []

  def record_then_fail_4(step):
    during[step] = _checkpoints(workdir)[0]  # the complete steps while `step` is written
    if step == 4 and not failed:
      failed.append(step)
      raise OSError(errno.ENOSPC, "No space left on device")

  _hook_state_writes(monkeypatch, record_then_fail_4)
  with pytest.raises(checkpoint_lib.CheckpointWriteError, match="last complete checkpoint, step 2,"):
    train.run(config, workdir)
  assert during == {1: [], 2: [1], 4: [2]}
  assert _checkpoints(workdir) == ([2], [4])

  train.run(config, workdir)  # the hook still records, and no longer fails
  assert during == {1: [], 2: [1], 4: [2], 6: [4]}
  assert _checkpoints(workdir) == ([6], [])
  assert _losses(workdir) == straight_losses


def test_unfinished_writes_are_removed_by_the_trainer_only(tmp_path, monkeypatch):
  """A `<step>.orbax-checkpoint-tmp` folder (a kill mid-save) goes, with a line, when the
  trainer opens its checkpoints; a reader (vlpre.evaluate) leaves it (it may be a live
  trainer's write in progress)."""
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
  ckpt.save(1, {"w": jax.numpy.ones(3)}, None, force=True)
  ckpt.close()
  for step in (2, 3, 4):  # three kills mid-save, one after another
    (tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp" / "state" / "data").write_bytes(
        b"x" * 99)
  lines = []
  monkeypatch.setattr(checkpoint_lib.logging, "warning", lambda fmt, *a: lines.append(fmt % a))
  checkpoint_lib.Checkpointer(directory).close()
  assert _checkpoints(str(tmp_path)) == ([1], [2, 3, 4]) and not lines
  checkpoint_lib.Checkpointer(directory, remove_unfinished=True).close()
  assert _checkpoints(str(tmp_path)) == ([1], [])
  assert len(lines) == 1 and "removing 3 unfinished checkpoint write" in lines[0]
  assert all(f"{step}.orbax-checkpoint-tmp" in lines[0] for step in (2, 3, 4))


def test_bad_sample_counts_survive_a_resume(tmp_path):
  """The counters item round-trips; a checkpoint without it (older vlpre) restores as zeros."""
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  state = {"w": jax.numpy.ones(3)}
  guard = data.BadSampleGuard(0.5)
  guard.update(3, 61)
  ckpt.save(1, state, None, counters=guard.counts(), force=True)
  ckpt.save(2, state, None, force=True)  # as written before the counters existed
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  resumed, old = data.BadSampleGuard(0.5), data.BadSampleGuard(0.5)
  resumed.restore(ckpt.restore_counters(1))
  old.restore(ckpt.restore_counters(2))
  ckpt.close()
  assert (resumed.bad, resumed.good) == (3, 61) and (old.bad, old.good) == (0, 0)


# Subprocess tests: the real entry point, killed for real.


@pytest.fixture(scope="module")
def main_env(xla_cache):
  """The children's environment: this process's XLA flags and compilation cache."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": xla_cache,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _config_file(data_dir, tmp_path):
  path = tmp_path / "fault_config.py"
  path.write_text("from tests import test_faults\n\n\ndef get_config(arg=None):\n"
                  f"  return test_faults.fault_config({data_dir!r}, staged=arg == 'staged',\n"
                  "                                  evals=arg != 'no_evals')\n")
  return str(path)


def _start(fault, config, workdir, env, flags=()):
  """Starts `python -m tests.test_faults FAULT`; returns (process, its log file)."""
  log = f"{workdir}.{fault}.{time.time_ns()}.log"
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_faults", fault, f"--config={config}",
         f"--workdir={workdir}", *flags], cwd=ROOT, env=env, stdout=out,
        stderr=subprocess.STDOUT)
  return proc, log


def _main(fault, config, workdir, env, *, flags=(), kill_after=None, delay=0.0, timeout=300):
  """Runs `python -m tests.test_faults FAULT` to its end, or kill -9 `delay` s after its log
  shows `kill_after`. Returns (exit status, log)."""
  proc, log = _start(fault, config, workdir, env, flags)
  try:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
      with open(log, encoding="utf-8") as f:
        text = f.read()
      if kill_after is not None and kill_after in text:
        time.sleep(delay)
        proc.kill()
      elif time.monotonic() > deadline:
        pytest.fail(f"{fault}: no exit (or no {kill_after!r}) in {timeout} s:\n{_tail(text)}")
      time.sleep(0.1)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
  with open(log, encoding="utf-8") as f:
    return proc.returncode, f.read()


def _tail(log):
  return "\n".join(log.splitlines()[-25:])


@pytest.mark.integration
def test_kill_9_anywhere_and_sigterm_mid_step_then_resume(data_dir, tmp_path, main_env,
                                                          straight_losses):
  """`python -m vlpre.main` killed (kill -9) at a random moment, in an evaluator and in a
  checkpoint write, then stopped by SIGTERM during a step, rerun each time: the requeue
  status after the SIGTERM with that step saved, 0 at the end, and the uninterrupted
  run's losses and evaluations."""
  config, workdir = _config_file(data_dir, tmp_path), str(tmp_path / "run")
  seed = random.randrange(1000)
  delay = random.Random(seed).uniform(0.0, 1.5)
  status, log = _main("none", config, workdir, main_env, kill_after="step 1/6", delay=delay)
  assert status == -signal.SIGKILL, f"random kill (seed {seed}) missed the run:\n{_tail(log)}"

  status, log = _main("hang_in_eval", config, workdir, main_env, kill_after="FAULT")
  assert status == -signal.SIGKILL, _tail(log)
  status, log = _main("hang_in_save", config, workdir, main_env, kill_after="FAULT")
  assert status == -signal.SIGKILL, _tail(log)
  complete, cut_off = _checkpoints(workdir)
  assert cut_off and cut_off[-1] > complete[-1], (complete, cut_off)  # killed mid-write

  status, log = _main("sigterm_in_step", config, workdir, main_env)
  stopped_at = complete[-1] + 1  # the step the SIGTERM came in
  assert status == 143 and f"step {stopped_at} is saved in" in log, _tail(log)
  assert _checkpoints(workdir)[0][-1] == stopped_at
  # the write the kill cut off went at this start, with a line: kills never pile up disk
  assert f"{cut_off[-1]}.orbax-checkpoint-tmp" in log and "unfinished checkpoint write" in log
  assert _checkpoints(workdir)[1] == [], _checkpoints(workdir)

  status, log = _main("none", config, workdir, main_env)
  assert status == 0, _tail(log)
  assert _losses(workdir) == straight_losses, f"kill seed {seed}"
  assert all(_evaluated(workdir)[step] == ["retrieval_a", "retrieval_b"] for step in (2, 4, 6))
  status, log = _main("none", config, workdir, main_env)  # a finished run: nothing to do
  assert status == 0 and "the run is finished; nothing left to run" in log, _tail(log)


@pytest.mark.integration
def test_staged_run_stopped_mid_stage_exits_with_the_requeue_status(data_dir, tmp_path, main_env):
  config, workdir = _config_file(data_dir, tmp_path) + ":staged", str(tmp_path / "staged")
  status, log = _main("sigterm_in_step", config, workdir, main_env)
  assert status == 143, _tail(log)
  assert sorted(os.listdir(workdir)) == ["0_a", "config.json"]  # the run's record
  assert _checkpoints(os.path.join(workdir, "0_a")) == ([1], [])


# What each fault's one line says (fault: pattern), for `python -m vlpre.main` under it.
FATAL_LINES = {
    "nan": r"loss is nan at step 3; stopping\. The last good checkpoint \(step 2\) in .* is intact",
    "metrics_enospc": r"metrics of step 3 could not be written to .*/metrics\.jsonl \(No space "
                      r"left on device\); stopping\. The complete checkpoints are intact",
    "tensorboard_eio": r"metrics of step 3 could not be written to .*/tensorboard \(Input/output "
                       r"error\); stopping",
    "checkpoint_enospc": r"checkpoint step 4 could not be written to .* \(\[Errno 28\] No space "
                         r"left on device\); the last complete checkpoint, step 2, is intact",
    "data_item_enospc": r"checkpoint step 4 could not be written to .* \(\[Errno 28\] No space "
                        r"left on device\); the last complete checkpoint, step 2, is intact",
    "counters_item_eio": r"checkpoint step 4 could not be written to .* \(\[Errno 5\] "
                         r"Input/output error\); the last complete checkpoint, step 2, is intact",
    "read_error": r"the input of step 3 could not be read \(\[Errno 5\] Input/output error: "
                  r"'train-00001\.tar'\); stopping: the complete checkpoints are intact",
}


@pytest.mark.integration
@pytest.mark.parametrize("fault,verbose", [(f, False) for f in FATAL_LINES] + [("nan", True)])
def test_every_fatal_path_ends_with_one_line_and_exit_1(data_dir, tmp_path, main_env, fault,
                                                        verbose):
  """`python -m vlpre.main` under each fault: exit 1, its last line `vlpre: <what happened>`,
  the only such line, no traceback unless --verbose_logs; checkpoint 2 complete."""
  config, workdir = _config_file(data_dir, tmp_path) + ":no_evals", str(tmp_path / "run")
  status, log = _main(fault, config, workdir, main_env,
                      flags=["--verbose_logs"] if verbose else [])
  lines = log.strip().splitlines()
  assert status == 1, _tail(log)
  assert re.match("vlpre: " + FATAL_LINES[fault], lines[-1]), _tail(log)
  assert [line for line in lines if line.startswith("vlpre: ")] == lines[-1:]
  assert ("Traceback (most recent call last)" in log) == verbose, _tail(log)
  assert 2 in _checkpoints(workdir)[0]


@pytest.mark.integration
def test_damaged_training_shards_through_vlpre_main(data_dir, tmp_path, main_env):
  """`python -m vlpre.main` on three damaged copies of real Flickr8k shards: in one, the 6th
  sample's image header has a negative size field with a valid checksum (such a header
  once made the indexer loop forever); one is cut off mid-member; in the third, the 3rd
  sample's image is a PNG declaring 10^10 pixels (a decompression bomb). The run finishes
  (exit 0), a warning names each damaged shard and its fault, the bomb is a bad sample
  found from its header, and metrics.jsonl counts the lost samples in
  `input/bad_fraction`."""
  shards = tmp_path / "damaged"
  shards.mkdir()

  def copy(pattern, name):
    scratch = tmp_path / name
    scratch.mkdir()
    path = shards / f"{name}-00000.tar"
    os.rename(helpers.small_shard(data_dir, scratch, pattern, 24), path)
    return str(path)

  crafted = copy("flickr8k/train-00000.tar", "crafted")
  with tarfile.open(crafted) as tf:
    headers = [i.offset for i in tf if i.name.endswith(".jpg")]
  _rewrite_size(crafted, headers[5], _SIZE_FIELDS["negative"])
  cut = copy("flickr8k/train-00001.tar", "cut")
  os.truncate(cut, 2 * os.path.getsize(cut) // 3)
  bomb = copy("flickr8k/train-00002.tar", "bomb")
  with tarfile.open(bomb) as tf:
    members = [(m, tf.extractfile(m).read()) for m in tf]
  bomb_key = [m.name for m, _ in members if m.name.endswith(".jpg")][2].split(".")[0]
  with tarfile.open(bomb, "w") as tf:
    for member, payload in members:
      if member.name == bomb_key + ".jpg":
        payload = _png_declaring(100_000, 100_000)
        member.size = len(payload)
      tf.addfile(member, io.BytesIO(payload))
  config, workdir = _config_file(data_dir, tmp_path) + ":no_evals", str(tmp_path / "run")
  status, log = _main("none", config, workdir, main_env,
                      flags=[f"--config.input.train={shards}/*.tar"])
  assert status == 0, _tail(log)
  assert re.search(rf"{re.escape(crafted)}: bad tar header at byte {headers[5]} \(negative "
                   r"size field .*counted as \d+ bad sample", log), _tail(log)
  assert re.search(rf"{re.escape(cut)}: (member .* is )?cut off", log), _tail(log)
  assert re.search(rf"skipping bad sample .*{bomb_key}'?: 'jpg' declares .*pixels.* the limit "
                   r"of 67108864 .*: a decompression bomb\?", log), _tail(log)
  fractions = _bad_fractions(workdir)
  assert fractions and 0 < fractions[6] < 0.5, fractions  # 96 draws of 72 samples: seen

  # Stopped at step 1 (SIGTERM) and resumed: the bad-sample counts come back with the
  # checkpoint, so every step logs the fraction the uninterrupted run logged.
  flags = [f"--config.input.train={shards}/*.tar"]
  resumed = str(tmp_path / "resumed")
  assert _main("sigterm_in_step", config, resumed, main_env, flags=flags)[0] == 143
  status, log = _main("none", config, resumed, main_env, flags=flags)
  assert status == 0 and "resuming from" in log, _tail(log)
  assert _bad_fractions(resumed) == fractions

  # Past input.max_bad_fraction (checked once 256 samples are seen): exit 1, one line.
  status, log = _main("none", config, str(tmp_path / "strict"), main_env, flags=[
      *flags, "--config.total_steps=20", "--config.input.max_bad_fraction=0.01"])
  assert status == 1, _tail(log)
  assert re.match(r"vlpre: \d+ of \d+ input samples were unreadable .*input\.max_bad_fraction=0\.01",
                  log.strip().splitlines()[-1]), _tail(log)


def _bad_fractions(workdir):
  """{step: input/bad_fraction} from a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {row["step"]: row["input/bad_fraction"] for row in map(json.loads, f)
            if "input/bad_fraction" in row}


def _nan_in_batch(patch, step):
  """The batch of `step` (counted from 1, as `run` counts a fresh run's steps) is all NaN."""
  real_device_batch = train_state.Setup.device_batch
  calls = []

  def device_batch(self, batch):
    calls.append(None)
    if len(calls) == step:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return real_device_batch(self, batch)

  patch.setattr(train_state.Setup, "device_batch", device_batch)


def _metrics_fail_from(patch, step, where):
  """From `step` on, metric writes fail: metrics.jsonl with ENOSPC (its file is swapped
  for /dev/full, whose writes the kernel refuses so), or TensorBoard's with EIO."""
  real_write = metrics.MetricWriter.write
  failing = []

  def write(self, at_step, values):
    if at_step >= step and not failing:
      failing.append(at_step)
      if where == "metrics.jsonl":
        self._file.close()  # pylint: disable=protected-access
        self._file = open("/dev/full", "a", encoding="utf-8")  # pylint: disable=protected-access,consider-using-with
    return real_write(self, at_step, values)

  real_flush = record_writer.RecordWriter.flush

  def flush(self):
    if failing and where == "tensorboard":
      raise OSError(errno.EIO, "Input/output error")
    return real_flush(self)

  patch.setattr(metrics.MetricWriter, "write", write)
  patch.setattr(record_writer.RecordWriter, "flush", flush)


def _read_error_in_batch(patch, step, process=None):
  """Reading the batch of `step` raises EIO, as a lost mount or a failing disk would (on
  `process` alone, if given: one host's input share)."""
  real_build = data.build_train_dataset

  def build(*args, **kwargs):
    calls = []

    def read(batch):
      calls.append(None)
      if len(calls) == step + 1 and process in (None, jax.process_index()):  # train.run
        # draws one example batch first
        raise OSError(errno.EIO, "Input/output error", "train-00001.tar")
      return batch

    return real_build(*args, **kwargs).map(read)

  patch.setattr(data, "build_train_dataset", build)


@pytest.mark.integration
def test_a_second_trainer_is_refused_and_a_dead_ones_lock_taken_over(data_dir, tmp_path, main_env,
                                                                     straight_losses):
  """Trainer A hangs in its first checkpoint write, holding the workdir. B, on the same
  workdir, exits 1 with one line naming A (host, pid, start time) and changes nothing.
  A is killed (kill -9): C takes its lock over and removes A's unfinished write, each
  with a line, and finishes with the uninterrupted run's losses."""
  config, workdir = _config_file(data_dir, tmp_path) + ":no_evals", str(tmp_path / "run")
  proc, log_a = _start("hang_in_save", config, workdir, main_env)
  try:
    deadline = time.monotonic() + 300  # a safety net, not a timing assertion
    while "FAULT" not in open(log_a, encoding="utf-8").read():
      assert proc.poll() is None and time.monotonic() < deadline, _tail(open(log_a).read())
      time.sleep(0.1)
    lock = json.loads(open(os.path.join(workdir, "trainer.lock"), encoding="utf-8").read())
    before = _tree(workdir)
    status, log = _main("none", config, workdir, main_env)
    assert status == 1, _tail(log)
    assert log.strip().splitlines()[-1] == (
        f"vlpre: workdir {workdir} is in use by another trainer (host {socket.gethostname()}, "
        f"pid {proc.pid}, started {lock['started']}; lock file {workdir}/trainer.lock): stop "
        f"that trainer or wait for it to finish"), _tail(log)
    assert _tree(workdir) == before
  finally:
    proc.kill()
    proc.wait()
  assert _checkpoints(workdir)[1], "A was to be killed mid-write"

  status, log = _main("none", config, workdir, main_env)
  assert status == 0, _tail(log)
  assert re.search(rf"taking over the lock of a trainer that is gone \(host .*, pid {proc.pid}, "
                   rf"started .*\): its process no longer runs", log), _tail(log)
  assert re.search(r"removing 1 unfinished checkpoint write\(s\) left in .* by an earlier run: "
                   r"1\.orbax-checkpoint-tmp", log), _tail(log)
  assert _checkpoints(workdir)[1] == [] and not os.path.exists(os.path.join(workdir, "trainer.lock"))
  assert _losses(workdir) == straight_losses


def _tree(directory):
  """{relative path: bytes} of every file under `directory` but the lock, whose heartbeat
  its holder renews."""
  return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(directory) for f in files if f != "trainer.lock"}


def _main_with_fault(fault: str, argv: list[str]) -> None:
  """`python -m vlpre.main` with one deterministic fault, for the subprocess tests above.

    none               no fault
    hang_in_eval       the first evaluator prints FAULT and hangs there (to be killed)
    hang_in_save       the first checkpoint write prints FAULT and never completes
    sigterm_in_step    a SIGTERM to itself while its first step runs
    nan                step 3's batch is NaN
    metrics_enospc     metrics.jsonl's writes fail with ENOSPC from step 3 on
    tensorboard_eio    TensorBoard's writes fail with EIO from step 3 on
    checkpoint_enospc  step 4's checkpoint write fails with ENOSPC
    data_item_enospc   step 4's input-position item (grain's) fails with ENOSPC
    counters_item_eio  step 4's counters item (bad-sample counts) fails with EIO
    read_error         reading step 3's batch fails with EIO
    read_error_on_1    the same on process 1 of a multi-process run only
    stale_view_on_1    process 1 sees no checkpoint (a stale listing of a shared directory)
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from vlpre import main  # pylint: disable=g-import-not-at-top
  from vlpre import config_lib  # pylint: disable=g-import-not-at-top

  def hang(where):
    print("FAULT: hanging in", where, flush=True)
    time.sleep(3600)

  def disk_full(step):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")

  def io_error(step):
    if step == 4:
      raise OSError(errno.EIO, "Input/output error")

  patch = pytest.MonkeyPatch()
  if fault == "nan":
    _nan_in_batch(patch, 3)
  elif fault in ("metrics_enospc", "tensorboard_eio"):
    _metrics_fail_from(patch, 3, "metrics.jsonl" if fault == "metrics_enospc" else "tensorboard")
  elif fault == "checkpoint_enospc":
    _hook_state_writes(patch, disk_full)
  elif fault == "data_item_enospc":
    _hook_data_item_writes(patch, disk_full)
  elif fault == "counters_item_eio":
    _hook_state_writes(patch, io_error, item="counters")
  elif fault == "read_error":
    _read_error_in_batch(patch, 3)
  elif fault == "read_error_on_1":
    _read_error_in_batch(patch, 3, process=1)
  elif fault == "stale_view_on_1":
    real_latest = checkpoint_lib.Checkpointer.latest_step
    patch.setattr(checkpoint_lib.Checkpointer, "latest_step",
                  lambda self: None if jax.process_index() == 1 else real_latest(self))
  elif fault == "hang_in_eval":
    patch.setattr(evaluators.Scheduled, "run", lambda self, variables: hang(self.name))
  elif fault == "hang_in_save":
    _hook_state_writes(patch, lambda step: hang(f"the write of step {step}"))
  elif fault == "sigterm_in_step":
    real_jit = train_state.Setup.jit_train_step

    def jit_train_step(self):
      step_fn, calls = real_jit(self), []

      def step_with_sigterm(*args):
        if not calls:
          _sigterm()
        calls.append(None)
        return step_fn(*args)

      return step_with_sigterm

    patch.setattr(train_state.Setup, "jit_train_step", jit_train_step)
  elif fault != "none":
    raise ValueError(f"unknown fault {fault!r}")
  app.run(main.main, argv=argv, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
  _main_with_fault(sys.argv[1], sys.argv[:1] + sys.argv[2:])
