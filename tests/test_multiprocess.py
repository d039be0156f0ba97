"""Multi-process training: 2 processes × 4 CPU devices train exactly what 1 × 8 trains.

The real trainer in two local processes joined by jax.distributed (the coordinator on a
free localhost port, gloo collectives between the processes' CPU devices), the tiny
CLIP of tests/helpers.py under its data=2 × fsdp=4 mesh (fsdp inside a process, data
across the two), 4 steps, a checkpoint every 2:

  1. both processes run to the checkpoint of step 2 and are killed (kill -9) there;
     each process's batch keys are recorded: disjoint, and together, in order, the
     1-process run's global batch of the same step (vlpre.data.records.HostShare);
  2. `python -m vlpre.main` in two fresh processes resumes from that checkpoint (each
     process restores its own data-iterator position) and finishes;
  3. metrics.jsonl, written by process 0 alone (one row a step), holds the losses of an
     uninterrupted 1-process × 8-device run of the same config;
  4. `python -m vlpre.evaluate` in two processes on the final checkpoint reports the
     metrics a 1-process × 8-device evaluation of that checkpoint reports.

The losses agree to float32 rounding (rtol 1e-5), not bit for bit: the same global
computation reduces across devices with XLA's in-process all-reduce in one case and
with gloo's across processes in the other, which sum in a different order (step 1, before
any update, already differs in the 7th digit). A wrong batch or augmentation moves a
loss by 0.1 or more.

This file doubles as the entry point of phase 1: `python -m tests.test_multiprocess
HANG_AFTER_STEP KEYS_FILE FLAGS...` is `python -m vlpre.main FLAGS...` that records each
process's batch keys and stops (hangs, to be killed) once the checkpoint of
HANG_AFTER_STEP is complete.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from vlpre import checkpoint as checkpoint_lib
from vlpre import distributed
from vlpre import metrics
from vlpre import train
from vlpre import train_state
from vlpre.text_encoders import store as store_lib

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, LOCAL_DEVICES = 2, 4
TOTAL_STEPS, SAVE_EVERY = 4, 2
TIMEOUT_S = 600  # a safety net for a hung run, not a timing assertion


def mp_config(data_dir):
  """tests.helpers' tiny CLIP: 4 steps, a checkpoint every 2, no evaluators."""
  c = helpers.tiny_clip_config(data_dir, total_steps=TOTAL_STEPS)
  c.checkpoint.every_steps = SAVE_EVERY
  c.evals = {}
  return c


def eval_config(data_dir):
  """mp_config with one evaluator, for vlpre.evaluate: retrieval on 64 Flickr8k val images."""
  c = mp_config(data_dir)
  c.evals = {"retrieval": helpers.tiny_clip_config(data_dir).evals["retrieval"]}
  return c


def _config_file(data_dir, tmp_path, function="mp_config"):
  path = tmp_path / f"{function}.py"
  path.write_text("from tests import test_multiprocess\n\n\ndef get_config(arg=None):\n"
                  f"  return test_multiprocess.{function}({data_dir!r})\n")
  return str(path)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(tmp_path, **extra):
  """A child's environment: 4 CPU devices, gloo across processes, a shared XLA cache."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "SLURM_", "VLPRE_MULTIHOST"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
             JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _start(argv, env, log):
  with open(log, "w", encoding="utf-8") as out:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def _read(log):
  with open(log, encoding="utf-8") as f:
    return f.read()


def _tail(log, n=25):
  return f"--- {log}:\n" + "\n".join(_read(log).splitlines()[-n:])


def _wait_for(procs, logs, text):
  """Until every log shows `text`; fails if a process exits first."""
  deadline = time.monotonic() + TIMEOUT_S
  while not all(text in _read(log) for log in logs):
    for proc, log in zip(procs, logs):
      if proc.poll() is not None and text not in _read(log):
        pytest.fail(f"exited with {proc.returncode} before {text!r}\n{_tail(log)}")
    if time.monotonic() > deadline:
      pytest.fail(f"no {text!r} in {TIMEOUT_S} s\n" + "\n".join(map(_tail, logs)))
    time.sleep(0.2)


def _wait_exit(procs, logs):
  deadline = time.monotonic() + TIMEOUT_S
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline:
      pytest.fail(f"no exit in {TIMEOUT_S} s\n" + "\n".join(map(_tail, logs)))
    time.sleep(0.2)
  return [p.returncode for p in procs]


def _kill(procs):
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def _run_all(tmp_path, name, argv):
  """`python argv --coordinator_address=... --num_processes=2 --process_id=I` as each of
  the 2 processes (jax.distributed from flags); asserts they all exit 0; their logs."""
  status, logs = _launch(tmp_path, name, lambda i: argv)
  assert status == [0] * PROCESSES, "\n".join(map(_tail, logs))
  return logs


def _launch(tmp_path, name, argv_of):
  """Process I runs `python argv_of(I) --coordinator_address=... --num_processes=2
  --process_id=I`; their exit statuses and logs once all have exited."""
  port = _free_port()
  logs = [str(tmp_path / f"{name}.{i}.log") for i in range(PROCESSES)]
  procs = [_start([*argv_of(i), f"--coordinator_address=localhost:{port}",
                   f"--num_processes={PROCESSES}", f"--process_id={i}"], _env(tmp_path), log)
           for i, log in enumerate(logs)]
  try:
    return _wait_exit(procs, logs), logs  # fails after TIMEOUT_S if a process hangs
  finally:
    _kill(procs)


def _keys_by_step(path):
  """{process: [keys of step 1, keys of step 2, ...]} from the phase-1 processes."""
  by_process = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      by_process.setdefault(row["process"], []).append(row["keys"])
  return by_process


def _checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


@pytest.mark.integration
def test_two_processes_train_like_one_through_a_kill_and_resume(data_dir, tmp_path, monkeypatch):
  config, workdir = _config_file(data_dir, tmp_path), str(tmp_path / "run")
  keys_file = str(tmp_path / "keys.jsonl")

  # Phase 1: 2 processes (jax.distributed from JAX_* variables) to the checkpoint of step 2.
  port = _free_port()
  logs = [str(tmp_path / f"phase1.{i}.log") for i in range(PROCESSES)]
  procs = [_start(["-m", "tests.test_multiprocess", str(SAVE_EVERY), keys_file,
                   f"--config={config}", f"--workdir={workdir}"],
                  _env(tmp_path, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                       JAX_NUM_PROCESSES=PROCESSES, JAX_PROCESS_ID=i), log)
           for i, log in enumerate(logs)]
  try:
    # Meanwhile, here: the reference, 1 process × 8 devices (conftest), its keys recorded.
    reference_keys = []
    real_device_batch = train_state.Setup.device_batch

    def recording_device_batch(self, batch):
      reference_keys.append(list(batch["_key"]))
      return real_device_batch(self, batch)

    monkeypatch.setattr(train_state.Setup, "device_batch", recording_device_batch)
    reference_dir = str(tmp_path / "reference")
    train.run(mp_config(data_dir), reference_dir)
    monkeypatch.undo()

    _wait_for(procs, logs, f"SAVED step {SAVE_EVERY}")
  finally:
    _kill(procs)  # kill -9, right after the checkpoint
  assert [p.returncode for p in procs] == [-signal.SIGKILL] * PROCESSES
  assert _checkpoint_steps(workdir)[-1] == SAVE_EVERY  # (orbax also keeps its first, step 1)
  data_state = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(SAVE_EVERY), "data")))
  assert [f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)] == [
      n for n in data_state if n.startswith("process_")]

  # Each process read its own half of every global batch: disjoint, together the reference's.
  keys = _keys_by_step(keys_file)
  assert sorted(keys) == list(range(PROCESSES))
  assert all(len(k) == SAVE_EVERY for k in keys.values())
  for step in range(SAVE_EVERY):
    share = [keys[p][step] for p in range(PROCESSES)]
    assert all(len(s) == 16 // PROCESSES for s in share)
    assert not set(share[0]) & set(share[1]), step
    assert share[0] + share[1] == reference_keys[step], step

  # Phase 2: vlpre.main, jax.distributed from flags, resumes and finishes, while process 1
  # sees no checkpoint at all (a stale listing): process 0's view decides for both.
  logs = _run_all(tmp_path, "phase2", ["-m", "tests.test_faults", "stale_view_on_1",
                                         f"--config={config}", f"--workdir={workdir}"])
  first, other = _read(logs[0]), _read(logs[1])
  assert f"resuming from {os.path.join(workdir, 'checkpoints')} step {SAVE_EVERY}" in first
  assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in first
  assert not re.search(r"step \d+/\d+ \|", other)  # progress lines: process 0's only
  assert _checkpoint_steps(workdir)[-2:] == [SAVE_EVERY, TOTAL_STEPS]

  # metrics.jsonl: one row a step (process 0 writes), the reference's losses.
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert logged == list(range(1, TOTAL_STEPS + 1))
  got = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}
  want = {r["step"]: r["loss"] for r in metrics.read_metrics(reference_dir)}
  assert sorted(got) == sorted(want) == list(range(1, TOTAL_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  assert len(set(want.values())) == TOTAL_STEPS  # the comparison can tell steps apart

  # Phase 3: `python -m vlpre.evaluate` in 2 processes (jax.distributed from flags) on the
  # final checkpoint reports what a 1-process × 8-device evaluation of it reports.
  logs = _run_all(tmp_path, "phase3", [
      "-m", "vlpre.evaluate", f"--config={_config_file(data_dir, tmp_path, 'eval_config')}",
      f"--workdir={workdir}"])
  printed = _read(logs[0])
  got = json.loads(printed[printed.index("\n{") + 1:printed.rindex("}") + 1])
  assert "\n{" not in _read(logs[1])  # process 0 speaks for the run
  from vlpre import evaluate  # pylint: disable=g-import-not-at-top
  want = evaluate.evaluate(eval_config(data_dir), workdir)
  assert sorted(got) == sorted(want) and any(k.startswith("retrieval/") for k in want), got
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-6), key


def embed_config(data_dir, shard, cache):
  """tests/test_lift.py's tiny LIFT, MiniLM as the frozen encoder, its store at `cache`."""
  from tests import test_lift  # pylint: disable=g-import-not-at-top
  c = test_lift.lift_config(data_dir, shard, encoder="minilm-l6", mode="cached")
  c.text_cache = cache
  return c


@pytest.mark.integration
def test_two_processes_build_the_store_one_process_builds(data_dir, tmp_path):
  """`python -m vlpre.embed` in 2 processes (the encoder sharded over both): process 0
  writes, and the store equals a 1-process × 8-device build of the same captions."""
  shard = helpers.small_shard(data_dir, tmp_path, num_samples=16)
  two, one = str(tmp_path / "store2"), str(tmp_path / "store1")
  config = tmp_path / "embed_config.py"
  config.write_text("from tests import test_multiprocess\n\n\ndef get_config(arg=None):\n"
                    f"  return test_multiprocess.embed_config({data_dir!r}, {shard!r}, {two!r})\n")
  _run_all(tmp_path, "embed", ["-m", "vlpre.embed", f"--config={config}"])
  built = store_lib.EmbeddingStore(two)
  reference = store_lib.build_store(embed_config(data_dir, shard, one), progress=False)
  assert len(built) == len(reference) == 16 and built.meta == reference.meta
  for key in reference._index:  # pylint: disable=protected-access
    for caption in range(5):
      np.testing.assert_allclose(built.lookup(key, caption), reference.lookup(key, caption),
                                 rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(built.mean(), reference.mean(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- bad launches


def _check_run(args, env):
  """`python -m vlpre.main --check` with `args`: (exit status, the last stderr line)."""
  out = subprocess.run([sys.executable, "-m", "vlpre.main", "--check", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  return out.returncode, lines[-1] if lines else ""


@pytest.mark.parametrize("flags, env, message", [
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2), {},
     "process id 2 is not in [0, 2) for 2 processes"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "localhost:1"},
     "multi-process launch: number of processes (--num_processes / JAX_NUM_PROCESSES) and "
     "process id (--process_id / JAX_PROCESS_ID) missing; give all three, or set "
     "VLPRE_MULTIHOST=1 to read them from the cluster (TPU pod, SLURM)"),
    ({}, {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "h:1"},
     "--num_processes / JAX_NUM_PROCESSES='two' is not an integer"),
    (dict(num_processes=0, process_id=0), {"JAX_COORDINATOR_ADDRESS": "h:1"},
     "number of processes must be at least 1, got 0"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), {},
     "coordinator address 'localhost' is not HOST:PORT"),
])
def test_bad_settings_are_one_line(flags, env, message):
  with pytest.raises(distributed.DistributedError) as error:
    distributed.detect(**flags, env=env)
  assert str(error.value) == message


def test_detect_reads_flags_over_environment_and_the_cluster_switch():
  env = {"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed.detect(env={}) is None
  assert distributed.detect(env=env) == distributed.Launch("a:1", 4, 3, auto=False)
  assert distributed.detect("b:2", 2, 0, env=env) == distributed.Launch("b:2", 2, 0, auto=False)
  # TPU pods and SLURM: JAX reads the cluster; whatever was given explicitly still applies.
  assert distributed.detect(env={"VLPRE_MULTIHOST": "1"}) == distributed.Launch(
      None, None, None, auto=True)
  assert distributed.detect(env={"SLURM_STEP_NUM_TASKS": "8", "JAX_COORDINATOR_ADDRESS": "c:3"}
                            ) == distributed.Launch("c:3", None, None, auto=True)
  assert distributed.detect(env={"SLURM_STEP_NUM_TASKS": "1"}) is None  # srun, 1 task


@pytest.mark.integration
def test_one_processs_fatal_error_ends_every_process_with_its_line(data_dir, tmp_path):
  """Process 1's input fails at step 3 (its share alone), while process 0 goes on into
  step 3's collectives: both exit 1 with process 1's line, no hang (vlpre/fatal.py)."""
  config, workdir = _config_file(data_dir, tmp_path), str(tmp_path / "run")
  status, logs = _launch(tmp_path, "fatal", lambda i: [
      "-m", "tests.test_faults", "read_error_on_1", f"--config={config}", f"--workdir={workdir}"])
  assert status == [1] * PROCESSES, "\n".join(map(_tail, logs))
  last = [_read(log).strip().splitlines()[-1] for log in logs]
  assert last[0] == last[1], "\n".join(map(_tail, logs))
  assert last[0].startswith("vlpre: process 1: the input of step 3 could not be read "
                            "([Errno 5] Input/output error"), last[0]
  assert "Traceback" not in _read(logs[0]) + _read(logs[1])


@pytest.mark.integration
def test_a_workdir_each_host_sees_apart_stops_before_step_1(data_dir, tmp_path):
  """Process 1's --workdir is another directory, as a per-host local disk at one path would
  be: both exit 1 with one line naming it, and no checkpoint is written anywhere."""
  config = _config_file(data_dir, tmp_path)
  workdirs = [tmp_path / "host0" / "run", tmp_path / "host1" / "run"]
  status, logs = _launch(tmp_path, "apart", lambda i: [
      "-m", "vlpre.main", f"--config={config}", f"--workdir={workdirs[i]}"])
  assert status == [1] * PROCESSES, "\n".join(map(_tail, logs))
  # Both processes find it; the line of whichever posted first ends both (vlpre/fatal.py).
  last = [_read(log).strip().splitlines()[-1] for log in logs]
  assert last[0] == last[1], "\n".join(map(_tail, logs))
  either = "|".join(re.escape(str(w)) for w in workdirs)
  assert re.fullmatch(
      rf"vlpre: process ([01]): workdir ({either}) is not shared: process 1 "
      r"of 2 cannot see the lock file process 0 wrote there \(trainer.lock\); give every host "
      r"one shared directory \(a gs:// path, NFS\) as --workdir", last[0]), last[0]
  assert "Traceback" not in _read(logs[0]) + _read(logs[1])
  assert not any((w / "checkpoints").exists() and any((w / "checkpoints").iterdir())
                 for w in workdirs)


@pytest.mark.integration
def test_a_bad_launch_exits_with_one_line(data_dir, tmp_path):
  status, line = _check_run([f"--config={_config_file(data_dir, tmp_path)}",
                             "--coordinator_address=localhost:1", "--num_processes=2",
                             "--process_id=2"], _env(tmp_path))
  assert status == 1 and line == "vlpre: process id 2 is not in [0, 2) for 2 processes", line


@pytest.mark.integration
def test_unreachable_coordinator_is_one_line(data_dir, tmp_path):
  port = _free_port()  # nothing listens there
  status, line = _check_run(
      [f"--config={_config_file(data_dir, tmp_path)}", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", "--process_id=1", "--distributed_timeout_s=3"], _env(tmp_path))
  assert status == 1, line
  assert line == (f"vlpre: could not join the 2-process run at localhost:{port} as process 1 "
                  f"within 3 s: the coordinator localhost:{port} is unreachable: start process "
                  f"0 there, or fix the address"), line


@pytest.mark.integration
def test_taken_port_is_one_line(data_dir, tmp_path):
  with socket.socket() as taken:  # JAX's coordinator binds [::]:PORT, which includes IPv4
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    status, line = _check_run(
        [f"--config={_config_file(data_dir, tmp_path)}", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", "--process_id=0"], _env(tmp_path))
  assert status == 1 and line == (f"vlpre: could not join the 2-process run at localhost:{port} "
                                  f"as process 0: port {port} is taken on this host"), line


@pytest.mark.integration
def test_num_processes_mismatch_is_one_line(data_dir, tmp_path):
  """Process 1 thinks the run has 3 processes; the run process 0 started has 2."""
  config, port = _config_file(data_dir, tmp_path), _free_port()
  log = str(tmp_path / "process0.log")
  process0 = _start(["-m", "vlpre.main", "--check", f"--config={config}",
                     f"--coordinator_address=localhost:{port}", "--num_processes=2",
                     "--process_id=0"], _env(tmp_path), log)
  try:
    status, line = _check_run([f"--config={config}", f"--coordinator_address=localhost:{port}",
                               "--num_processes=3", "--process_id=1"], _env(tmp_path))
  finally:
    _kill([process0])
  assert status == 1 and line == (
      f"vlpre: process 1 was started for 3 processes, but the run at localhost:{port} has 2: "
      f"give every process the same number"), line


# ------------------------------------------------------------------- phase-1 entry point


def _main_recording_keys_and_hanging_after_save(argv):
  """`python -m vlpre.main argv[3:]`, recording batch keys to argv[2], hanging after the
  checkpoint of step argv[1] is complete (for the test to kill)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vlpre import main  # pylint: disable=g-import-not-at-top
  from vlpre import config_lib  # pylint: disable=g-import-not-at-top

  hang_after, keys_file, flags = int(argv[1]), argv[2], argv[3:]
  patch = pytest.MonkeyPatch()
  real_device_batch, real_save = train_state.Setup.device_batch, checkpoint_lib.Checkpointer.save

  def device_batch(self, batch):
    with open(keys_file, "a", encoding="utf-8") as f:
      f.write(json.dumps({"process": jax.process_index(), "keys": list(batch["_key"])}) + "\n")
    return real_device_batch(self, batch)

  def save(self, step, *args, **kwargs):
    saved = real_save(self, step, *args, **kwargs)
    if saved and step == hang_after:
      self.wait()  # complete on disk, every process's part
      print(f"SAVED step {step}", flush=True)
      time.sleep(3600)
    return saved

  patch.setattr(train_state.Setup, "device_batch", device_batch)
  patch.setattr(checkpoint_lib.Checkpointer, "save", save)
  app.run(main.main, argv=[argv[0], *flags], flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
  _main_recording_keys_and_hanging_after_save(sys.argv)
