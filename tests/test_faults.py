"""Fault injection: what vlpre does when things break (README "Failure behaviour").

Data section: real CIFAR-10 samples copied into small shards, then damaged the ways
storage damages them (a copy cut off, a header overwritten, bytes inserted, a file that
cannot be opened or read). Each damaged sample must come out as a counted bad record,
every intact one must decode, training input must go on, and past
`input.max_bad_fraction` the run must stop with train.BadSampleGuard's one line.
"""
import os
import tarfile

import ml_collections
import pytest

from vlpre import data
from vlpre import train
from vlpre.data import sources
from vlpre.data import tar_scan
from vlpre.data import transforms as T

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
  header, _ = members[f"{keys[5]}.png"]
  with open(path, "r+b") as f:
    f.seek(header)
    block = bytearray(f.read(512))
    block[124:136] = b"%011o\0" % (1 << 20)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    f.seek(header)
    f.write(block)
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
  guard = train.BadSampleGuard(cfg.max_bad_fraction)
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
  guard = train.BadSampleGuard(cfg.max_bad_fraction)  # as train.run builds it
  with pytest.raises(RuntimeError) as err:
    for _ in range(200):
      guard.update(next(it)["_num_bad"], 4)
  message = str(err.value)
  assert "\n" not in message and "input.max_bad_fraction=0.01" in message
  assert guard.bad + guard.good >= guard.min_samples
