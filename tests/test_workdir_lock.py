"""vlpre/workdir_lock.py: one trainer per workdir; a gone holder's lock is taken over.

Holders are made the way a trainer would leave them: a record naming a live process (a
`sleep` child), one whose process has exited, one whose pid was reused, one from another
host whose heartbeat moves or stopped. The real trainer's refusal (`python -m
vlpre.main` on a held workdir) is in tests/test_faults.py, the bucket case in
tests/test_storage.py.
"""
import json
import os
import socket
import subprocess
import threading
import time

from absl import logging
import pytest

from vlpre import workdir_lock
from vlpre.workdir_lock import WorkdirLock, WorkdirLockedError


@pytest.fixture
def sleeper():
  """A live process on this host (the holder of a hand-written lock)."""
  proc = subprocess.Popen(["sleep", "60"])
  yield proc
  proc.kill()
  proc.wait()


def _lock_file(workdir, **fields):
  """Writes a holder's record as WorkdirLock does; returns it."""
  record = dict(host=socket.gethostname(), pid_namespace=workdir_lock._pid_namespace(),  # pylint: disable=protected-access
                started="2026-01-02 03:04:05 UTC", heartbeat=time.time(), token="theirs",
                process_start="")
  record.update(fields)
  (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(record))
  return record


def _ours(workdir, lock):
  return json.loads((workdir / workdir_lock.LOCK_NAME).read_text())["token"] == lock.record["token"]


@pytest.fixture
def warnings(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, "warning", lambda fmt, *args: lines.append(fmt % args))
  return lines


def test_a_live_holder_is_named_and_nothing_is_written(tmp_path, sleeper):
  _lock_file(tmp_path, pid=sleeper.pid,
             process_start=workdir_lock._process_start(sleeper.pid))  # pylint: disable=protected-access
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  with pytest.raises(WorkdirLockedError) as error:
    WorkdirLock(str(tmp_path)).acquire()
  message = str(error.value)
  assert "\n" not in message
  assert (f"in use by another trainer (host {socket.gethostname()}, pid {sleeper.pid}, "
          f"started 2026-01-02 03:04:05 UTC") in message
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_second_lock_in_the_same_process_is_refused_until_released(tmp_path):
  first = WorkdirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
    WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
  second = WorkdirLock(str(tmp_path))
  second.acquire()
  assert _ours(tmp_path, second)
  second.release()


@pytest.mark.parametrize("how", ["exited", "pid_reused", "unreadable"])
def test_a_gone_holder_on_this_host_is_taken_over_with_a_line(tmp_path, sleeper, warnings, how):
  if how == "exited":
    done = subprocess.Popen(["true"])
    done.wait()
    _lock_file(tmp_path, pid=done.pid)
  elif how == "pid_reused":  # the pid runs, but it is another process than the holder
    _lock_file(tmp_path, pid=sleeper.pid, process_start="1")
  else:  # cut off by a full disk, say
    (tmp_path / workdir_lock.LOCK_NAME).write_text('{"host": "x", "pi')
  lock = WorkdirLock(str(tmp_path), settle_s=0)
  lock.acquire()
  assert _ours(tmp_path, lock)
  lock.release()
  assert len(warnings) == 1 and "taking over the lock of a trainer that is gone" in warnings[0]
  assert ("its process no longer runs" if how != "unreadable" else "unreadable") in warnings[0]


def test_another_hosts_holder_is_alive_while_its_heartbeat_moves(tmp_path, warnings):
  record = _lock_file(tmp_path, host="elsewhere", pid=7, heartbeat=time.time() - 1)
  stop = threading.Event()

  def beat():  # the holder's heartbeat thread, on the other host
    while not stop.wait(0.05):
      _lock_file(tmp_path, **{**record, "heartbeat": time.time()})

  holder = threading.Thread(target=beat)
  holder.start()
  try:
    with pytest.raises(WorkdirLockedError, match="host elsewhere, pid 7"):
      WorkdirLock(str(tmp_path), heartbeat_s=0.05, stale_s=30).acquire()
  finally:
    stop.set()
    holder.join()
  assert "watching it" in warnings[0]


@pytest.mark.parametrize("last_beat_s", [1000, 0])
def test_another_hosts_holder_without_heartbeat_is_taken_over(tmp_path, warnings, last_beat_s):
  """Stale at once (1000 s ago), or fresh but never renewed within stale_s."""
  _lock_file(tmp_path, host="elsewhere", pid=7, heartbeat=time.time() - last_beat_s)
  lock = WorkdirLock(str(tmp_path), heartbeat_s=0.04, stale_s=0.2, settle_s=0)
  lock.acquire()
  assert _ours(tmp_path, lock)
  lock.release()
  assert "no heartbeat for" in warnings[-1] and "host elsewhere, pid 7" in warnings[-1]


def test_the_holder_renews_its_heartbeat(tmp_path):
  lock = WorkdirLock(str(tmp_path), heartbeat_s=0.02)
  lock.acquire()
  path = tmp_path / workdir_lock.LOCK_NAME
  first = json.loads(path.read_text())["heartbeat"]
  deadline = time.monotonic() + 10  # a safety net, not a timing assertion
  while json.loads(path.read_text())["heartbeat"] == first and time.monotonic() < deadline:
    time.sleep(0.02)
  assert json.loads(path.read_text())["heartbeat"] > first
  lock.release()
  assert not path.exists()


def test_held_releases_on_error_and_refuses_a_live_holder(tmp_path, sleeper):
  with pytest.raises(ZeroDivisionError):
    with workdir_lock.held(str(tmp_path)):
      assert (tmp_path / workdir_lock.LOCK_NAME).exists()
      _ = 1 / 0
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()
  _lock_file(tmp_path, pid=sleeper.pid)
  with pytest.raises(WorkdirLockedError, match=f"pid {sleeper.pid}"):
    with workdir_lock.held(str(tmp_path)):
      pytest.fail("entered a held workdir")
  assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["token"] == "theirs"
