"""Fault injection: what vlpre does when things break (README "Failure behaviour").

Data section: real CIFAR-10 samples copied into small shards, then damaged the ways
storage damages them (a copy cut off, a header overwritten, bytes inserted, a file that
cannot be opened or read). Each damaged sample must come out as a counted bad record,
every intact one must decode, training input must go on, and past
`input.max_bad_fraction` the run must stop with train.BadSampleGuard's one line.

Run section: the real trainer stopped (SIGTERM) or killed (kill -9) in each phase of its
loop (a step, an evaluator, a checkpoint write), fed a NaN batch, or denied disk space,
then resumed; see the section's own comment. This file doubles as the fault-injecting
entry point its subprocess tests start: `python -m tests.test_faults FAULT --config=...`.
"""
import errno
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vlpre import checkpoint as checkpoint_lib
from vlpre import data
from vlpre import evaluators
from vlpre import metrics
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


def _hook_state_writes(patch, fn):
  """Calls fn(step) inside the background part of every checkpoint's state write.

  That is where a full disk or a slow bucket shows up: the step's directory exists, its
  arrays are being written, and it is not complete until `fn` returns.
  """
  real = ocp.StandardCheckpointHandler.async_save

  async def async_save(self, directory, *args, **kwargs):
    futures = list(await real(self, directory, *args, **kwargs) or [])
    match = re.search(r"/(\d+)\.orbax-checkpoint-tmp[^/]*/state", str(directory))
    if match:
      futures.append(_CallOnWait(lambda: fn(int(match.group(1)))))
    return futures

  patch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


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
  real_device_batch = train.Setup.device_batch
  calls = []

  def device_batch(self, batch):
    calls.append(None)
    if len(calls) == 3:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return real_device_batch(self, batch)

  monkeypatch.setattr(train.Setup, "device_batch", device_batch)
  with pytest.raises(FloatingPointError, match=r"at step 3.*checkpoint \(step 2\).*intact"):
    train.run(fault_config(data_dir, evals=False), workdir)
  assert _checkpoints(workdir) == ([1, 2], [])
  assert _losses(workdir) == {s: straight_losses[s] for s in (1, 2)}


@pytest.mark.integration
def test_full_disk_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch, straight_losses):
  """Step 4's write fails with ENOSPC: one clear line; checkpoint 2 intact and resumable."""
  config, workdir = fault_config(data_dir, evals=False), str(tmp_path)

  def disk_full(step):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device")

  _hook_state_writes(monkeypatch, disk_full)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as error:
    train.run(config, workdir)  # the async write's failure surfaces at the next save (6)
  message = str(error.value)
  assert "\n" not in message and error.value.errno == errno.ENOSPC
  assert "step 4 could not be written" in message and "No space left on device" in message
  assert "last complete checkpoint, step 2, is intact" in message
  assert _checkpoints(workdir) == ([1, 2], [4])

  monkeypatch.undo()
  train.run(config, workdir)
  assert _checkpoints(workdir)[0][-1] == TOTAL_STEPS
  assert _losses(workdir) == straight_losses


def test_bad_sample_counts_survive_a_resume(tmp_path):
  """The counters item round-trips; a checkpoint without it (older vlpre) restores as zeros."""
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  state = {"w": jax.numpy.ones(3)}
  guard = train.BadSampleGuard(0.5)
  guard.update(3, 61)
  ckpt.save(1, state, None, counters=guard.counts(), force=True)
  ckpt.save(2, state, None, force=True)  # as written before the counters existed
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  resumed, old = train.BadSampleGuard(0.5), train.BadSampleGuard(0.5)
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
                  f"  return test_faults.fault_config({data_dir!r}, staged=arg == 'staged')\n")
  return str(path)


def _main(fault, config, workdir, env, *, kill_after=None, delay=0.0, timeout=300):
  """Runs `python -m tests.test_faults FAULT` to its end, or kill -9 `delay` s after its log
  shows `kill_after`. Returns (exit status, log)."""
  log = f"{workdir}.{fault}.{time.time_ns()}.log"
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_faults", fault, f"--config={config}",
         f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
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
  assert sorted(os.listdir(workdir)) == ["0_a"]
  assert _checkpoints(os.path.join(workdir, "0_a")) == ([1], [])


def _main_with_fault(fault: str, argv: list[str]) -> None:
  """`python -m vlpre.main` with one deterministic fault, for the subprocess tests above.

    none             no fault
    hang_in_eval     the first evaluator prints FAULT and hangs there (to be killed)
    hang_in_save     the first checkpoint write prints FAULT and never completes
    sigterm_in_step  a SIGTERM to itself while its first step runs
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from vlpre import main  # pylint: disable=g-import-not-at-top

  def hang(where):
    print("FAULT: hanging in", where, flush=True)
    time.sleep(3600)

  patch = pytest.MonkeyPatch()
  if fault == "hang_in_eval":
    patch.setattr(evaluators.Scheduled, "run", lambda self, variables: hang(self.name))
  elif fault == "hang_in_save":
    _hook_state_writes(patch, lambda step: hang(f"the write of step {step}"))
  elif fault == "sigterm_in_step":
    real_jit = train.Setup.jit_train_step

    def jit_train_step(self):
      step_fn, calls = real_jit(self), []

      def step_with_sigterm(*args):
        if not calls:
          _sigterm()
        calls.append(None)
        return step_fn(*args)

      return step_with_sigterm

    patch.setattr(train.Setup, "jit_train_step", jit_train_step)
  elif fault != "none":
    raise ValueError(f"unknown fault {fault!r}")
  app.run(main.main, argv=argv, flags_parser=main._parse_flags)  # pylint: disable=protected-access


if __name__ == "__main__":
  _main_with_fault(sys.argv[1], sys.argv[:1] + sys.argv[2:])
