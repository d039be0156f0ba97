"""One trainer per workdir: a lock file, `<workdir>/trainer.lock`, held while `train.run` runs.

Two trainers on one workdir (a requeued job that overlaps a slow teardown, a command
started twice) would both write its checkpoints and metrics. The lock names its holder
(host, pid, start time) and carries a heartbeat that a background thread renews every
`HEARTBEAT_S` seconds. A second trainer reads it and:
  * exits with one line naming the holder when the holder is alive, and leaves the
    workdir untouched;
  * takes the lock over, with a line saying so, when the holder is gone: on this machine
    (same host name and pid namespace) its process no longer runs (a reused pid is told
    apart by the process's start time); on another host its heartbeat stopped `STALE_S`
    seconds ago. A fresh heartbeat from another host is watched until it moves (alive)
    or goes stale (gone), at most `STALE_S` seconds.
The lock is released (the file removed) when the run returns or raises; a kill -9 leaves
it behind for the next trainer to take over as above.

Local workdirs create the file atomically (O_EXCL). In a bucket (`gs://`) there is no
atomic create through epath, so the trainer writes its record, waits `SETTLE_S` seconds
and reads it back: of two trainers starting within the same second the later write
wins and the other one exits. The same read-back guards a takeover on any storage.

In a multi-process run process 0 holds the lock and tells the others the outcome
(`held`), so every process of a refused run exits with the same line.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from absl import logging
import jax

from vlpre import distributed
from vlpre import storage

LOCK_NAME = "trainer.lock"
HEARTBEAT_S = 30.0  # how often the holder renews its heartbeat
STALE_S = 120.0     # another host's holder is gone after this long without a heartbeat
SETTLE_S = 1.0      # wait between writing the record and reading it back (bucket, takeover)


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir; the message is one line naming it."""


def _pid_namespace() -> str:
  """Processes in another pid namespace (container) on the same host cannot be checked."""
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


def _process_start(pid: int) -> str | None:
  """The start time (clock ticks since boot) of a running process; None if it is gone or a
  zombie; "" where /proc cannot tell (then only its existence is checked)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except FileNotFoundError:
    return None
  except OSError:
    return ""
  return None if fields[0] in ("Z", "X") else fields[19]


def _read_record(path) -> dict | None:
  """A lock file's record; None if there is no lock; {} if it cannot be parsed."""
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
  except json.JSONDecodeError:
    return {}
  return record if isinstance(record, dict) else {}


class WorkdirLock:
  """The lock of one workdir (module docstring). `acquire`, then `release`."""

  def __init__(self, workdir: str, *, heartbeat_s: float | None = None,
               stale_s: float | None = None, settle_s: float | None = None):
    self.workdir = storage.path(workdir, what="workdir")
    self.path = self.workdir / LOCK_NAME
    self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
    self.stale_s = STALE_S if stale_s is None else stale_s
    self.settle_s = SETTLE_S if settle_s is None else settle_s
    pid = os.getpid()
    self.record = {
        "host": socket.gethostname(), "pid": pid, "pid_namespace": _pid_namespace(),
        "process_start": _process_start(pid) or "",
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "heartbeat": time.time(), "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # ------------------------------------------------------------------ holding

  def acquire(self) -> None:
    """Takes the lock, or raises `WorkdirLockedError` naming the live holder."""
    while True:
      holder = self._read()
      if holder is None:  # no lock
        if not self._create():
          continue  # another trainer created it just now: judge that one
        if storage.is_uri(self.path):
          self._check_still_ours()
        break
      gone = self._gone(holder)
      if gone is None:
        raise WorkdirLockedError(self._describe(holder))
      if gone == "":  # released while we watched
        continue
      logging.warning("workdir %s: taking over the lock of a trainer that is gone (%s): %s",
                      self.workdir, self._holder(holder), gone)
      self._write()
      self._check_still_ours()
      break
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still this trainer's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    try:
      holder = self._read()
      if holder and holder.get("token") == self.record["token"]:
        self.path.unlink()
    except OSError as e:  # the run's outcome matters more than a lock left behind
      logging.warning("workdir %s: could not remove %s (%s); the next trainer takes it over",
                      self.workdir, self.path, e)

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._read()
        if not holder or holder.get("token") != self.record["token"]:
          logging.error("workdir %s: the lock is now held by %s; this trainer stops renewing it",
                        self.workdir, self._holder(holder or {}))
          return
        self._write()
      except OSError as e:
        logging.warning("workdir %s: could not renew the lock's heartbeat (%s)", self.workdir, e)

  # ------------------------------------------------------------------ judging a holder

  def _gone(self, holder: dict) -> str | None:
    """Why the holder is gone; None if it is alive; "" if it released the lock meanwhile."""
    if not holder.get("token"):
      return "the lock file is unreadable"
    if (holder.get("host"), holder.get("pid_namespace")) == (self.record["host"],
                                                              self.record["pid_namespace"]):
      return None if self._runs_here(holder) else "its process no longer runs"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_s:
      return f"no heartbeat for {age:.0f} s"
    logging.warning("workdir %s is locked by %s, last heartbeat %.0f s ago: watching it for up "
                    "to %.0f s to see whether that trainer is alive", self.workdir,
                    self._holder(holder), age, self.stale_s - age)
    deadline = time.monotonic() + self.stale_s - age
    while time.monotonic() < deadline:
      time.sleep(min(self.heartbeat_s / 4, 5.0))
      now = self._read()
      if now is None:
        return ""
      if now != holder:  # renewed (alive), or taken by a third trainer
        return None
    return f"no heartbeat for {self.stale_s:.0f} s"

  @staticmethod
  def _runs_here(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
      return False
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:  # another user's process: it exists
      pass
    start = _process_start(pid)
    if start is None:
      return False
    return not (start and holder.get("process_start") and start != holder["process_start"])

  def _describe(self, holder: dict) -> str:
    return (f"workdir {self.workdir} is in use by another trainer ({self._holder(holder)}; "
            f"lock file {self.path}): stop that trainer or wait for it to finish")

  @staticmethod
  def _holder(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}")

  # ------------------------------------------------------------------ the file

  def _read(self) -> dict | None:
    return _read_record(self.path)

  def _create(self) -> bool:
    """Writes the record where there was no lock; False if another trainer was faster."""
    self.record["heartbeat"] = time.time()
    data = json.dumps(self.record)
    if storage.is_uri(self.path):
      self.path.write_text(data, encoding="utf-8")
      return True
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(data)
    return True

  def _write(self) -> None:
    self.record["heartbeat"] = time.time()
    storage.write_atomic(self.path, json.dumps(self.record))

  def _check_still_ours(self) -> None:
    """Reads the record back after `settle_s`: a concurrent writer's record means it won."""
    time.sleep(self.settle_s)
    holder = self._read()
    if not holder or holder.get("token") != self.record["token"]:
      raise WorkdirLockedError(self._describe(holder or {}))


@contextlib.contextmanager
def held(workdir: str, **options: Any) -> Iterator[WorkdirLock | None]:
  """The workdir locked for the block: process 0 holds the lock, every process learns the
  outcome, so a refused run raises the same one-line `WorkdirLockedError` everywhere."""
  lock = WorkdirLock(workdir, **options) if jax.process_index() == 0 else None
  refusal = ""
  if lock is not None:
    try:
      lock.acquire()
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Any: the other processes wait for this answer and must get one.
      refusal = str(e) if isinstance(e, WorkdirLockedError) else (
          f"workdir {lock.workdir}: could not take the lock {lock.path} ({e})")
  refusal = distributed.broadcast_text(refusal)
  if refusal:
    raise WorkdirLockedError(refusal)
  try:
    _check_shared(workdir, lock)
    yield lock
  finally:
    if lock is not None:
      lock.release()


class WorkdirNotSharedError(OSError):
  """Processes of one run see different directories at the workdir path; one line."""


def _check_shared(workdir: str, lock: WorkdirLock | None) -> None:
  """In a multi-process run: every process reads process 0's lock file and finds its token,
  or the run stops here, before step 1, with one line on every process. A workdir on each
  host's own disk would otherwise checkpoint every host's shards to a different place, and
  no resume could find them all."""
  if jax.process_count() == 1:
    return
  token = distributed.broadcast_text(lock.record["token"] if lock is not None else "")
  try:
    record = _read_record(storage.path(workdir, what="workdir") / LOCK_NAME)
  except OSError:  # unreadable here: as good as absent
    record = None
  seen = (record or {}).get("token") == token
  blind = distributed.processes_where(not seen)
  if blind:
    raise WorkdirNotSharedError(
        f"workdir {workdir} is not shared: process{'es' if len(blind) > 1 else ''} "
        f"{', '.join(map(str, blind))} of {jax.process_count()} cannot see the lock file "
        f"process 0 wrote there ({LOCK_NAME}); give every host one shared directory (a "
        f"gs:// path, NFS) as --workdir")
