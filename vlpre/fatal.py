"""A fatal error ends a command with one line and exit 1; the traceback only on request.

    with fatal.one_line_errors(verbose=_VERBOSE.value):
      train.run(config, workdir)

Every failure the trainer reports (NaN/Inf, too many bad samples, a checkpoint, metrics
or TensorBoard write that failed, a data read error, a workdir held by another trainer,
a bad setting) raises an exception whose message says what happened and what is safe.
This prints that message as `vlpre: <message>` on stderr and exits 1. `verbose`
(`--verbose_logs`) prints the traceback above it. An exception of another type (a bug)
gets its type name in the line and a pointer to `--verbose_logs`.

Multi-process runs: an error on one process (its bad-sample limit, a read error of its
input share) would leave the others waiting in the next collective for good. So the
failing process posts its line in jax.distributed's key-value store (`end_every_process`,
called where the trainer's loop fails, before its clean-up could wait on the others);
every other process watches that key from a thread (`watch_other_processes`, started by
`one_line_errors`) and exits 1 with the same line, prefixed by the failing process's
index. Process 0 leaves last: it hosts the coordination service, and a process whose
client loses the service aborts (a C++ fatal, no line, no exit status 1), so every other
process says it is leaving (`SEEN_KEY`) and process 0 waits up to `ACK_WAIT_S` for all of
them before it exits 1 too. Those exits skip clean-up: a checkpoint being written stays
unfinished (the next start removes it) and process 0's workdir lock is left for the
next trainer to take over (vlpre/workdir_lock.py).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import traceback
from typing import Iterator

import jax
from jax._src import distributed as jax_distributed  # the coordination service's client,
# reached as orbax reaches it (orbax.checkpoint's multihost.get_jax_distributed_client)

# The types vlpre raises for failures it explains: their message is the whole story.
EXPLAINED = (FloatingPointError, OSError, ValueError, RuntimeError)
MAX_CHARS = 2000  # an XLA error can run to pages; one line stays readable
FATAL_KEY = "vlpre/fatal"          # the failing process's line, in the key-value store
SEEN_KEY = "vlpre/fatal_seen/"     # + process index: that process saw it and is exiting
ACK_WAIT_S = 10.0                  # how long process 0 waits for the others to leave first
WATCH_POLL_MS = 500                # how long each wait of the watching thread lasts
_state = {"verbose": False, "watching": False}
_LEAVING = threading.Lock()  # the main thread and the watching one may both get there


def one_line(error: BaseException) -> str:
  """The error as one line: its message with newlines folded, its type where unexplained."""
  text = " ".join(str(error).split())
  if not isinstance(error, EXPLAINED) or not text:
    text = f"{type(error).__name__}: {text}".rstrip(": ")
    text += " (an unexpected error: --verbose_logs shows its traceback)"
  return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 1] + "…"


@contextlib.contextmanager
def one_line_errors(verbose: bool = False) -> Iterator[None]:
  """Turns an exception in the block into `vlpre: <one line>` and exit status 1 (on every
  process of a multi-process run)."""
  _state["verbose"] = verbose
  watch_other_processes()
  try:
    yield
  except Exception as e:  # pylint: disable=broad-exception-caught
    end_every_process(e)  # returns in a single-process run
    if verbose:
      traceback.print_exc()
    _exit_with(f"vlpre: {one_line(e)}", os_exit=False)


def _client():
  """jax.distributed's client; None unless this is one process of several."""
  return jax_distributed.global_state.client if jax.process_count() > 1 else None


def _exit_with(line: str, os_exit: bool) -> None:
  sys.stdout.flush()
  print(line, file=sys.stderr, flush=True)
  if os_exit:  # the main thread may be stuck in a collective: no clean-up can finish
    os._exit(1)  # pylint: disable=protected-access
  if not _state["verbose"] and "ipykernel" not in sys.modules:
    _silence_the_shutdown()
  sys.exit(1)


def _silence_the_shutdown() -> None:
  """The clean-up still runs (the workdir lock, open files), but what libraries print while
  the interpreter shuts down would land under the line that must stay last: an orbax
  thread failing after its write did (`_SignalingThread ... cannot schedule new futures`),
  a write coroutine left unawaited (`RuntimeWarning: Enable tracemalloc ...`). Without
  --verbose_logs that output goes to /dev/null (not in a notebook's kernel, which lives on)."""
  sys.stdout.flush()
  sys.stderr.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.close(devnull)


def watch_other_processes() -> None:
  """Starts the thread that ends this process with another process's fatal line; it stops
  when the process exits normally."""
  client = _client()
  if client is None or _state["watching"]:
    return
  _state["watching"] = True
  stop = threading.Event()

  def watch():
    # Short waits, not one long one: a thread still blocked inside the client when the
    # interpreter shuts down is torn down there, and the C++ runtime aborts the process.
    while not stop.is_set():
      try:
        line = client.blocking_key_value_get(FATAL_KEY, WATCH_POLL_MS)
        break
      except Exception as e:  # pylint: disable=broad-exception-caught
        if "DEADLINE_EXCEEDED" not in str(e):
          return  # the service is gone: the run is ending anyway
    else:
      return
    _leave(client, line)

  thread = threading.Thread(target=watch, name="vlpre-fatal-watch", daemon=True)
  thread.start()

  def stop_watching():
    stop.set()
    thread.join(timeout=10 * WATCH_POLL_MS / 1000)

  # Runs before jax.distributed's own shutdown (registered earlier; atexit runs last first).
  atexit.register(stop_watching)


def end_every_process(error: BaseException) -> None:
  """In a multi-process run: posts this error's line for every process and exits 1 once
  they saw it (or `ACK_WAIT_S` passed). Returns in a single-process run."""
  client = _client()
  if client is None:
    return
  if _state["verbose"]:
    traceback.print_exception(error)
  line = f"vlpre: process {jax.process_index()}: {one_line(error)}"
  try:
    client.key_value_set(FATAL_KEY, line)
  except Exception:  # pylint: disable=broad-exception-caught
    # ALREADY_EXISTS: another process failed first; its line is the run's.
    line = client.key_value_try_get(FATAL_KEY) or line
  _leave(client, line)


def _leave(client, line: str) -> None:
  """Exits 1 with `line`: after saying so in the store, and on process 0 (the coordination
  service's host) only once the others said so too, or `ACK_WAIT_S` passed."""
  if not _LEAVING.acquire(blocking=False):  # the other thread is exiting with the same line
    while True:
      time.sleep(1)
  try:
    client.key_value_set(SEEN_KEY + str(jax.process_index()), "1")
  except Exception:  # pylint: disable=broad-exception-caught
    pass  # the service is gone: nothing to tell
  if jax.process_index() == 0:
    deadline = time.monotonic() + ACK_WAIT_S
    for index in range(1, jax.process_count()):
      try:
        client.blocking_key_value_get(SEEN_KEY + str(index),
                                      max(int((deadline - time.monotonic()) * 1000), 1))
      except Exception:  # pylint: disable=broad-exception-caught
        break  # not seen in time (or that process is gone): exit regardless
    time.sleep(0.2)  # the last of them is past its own exit call
  _exit_with(line, os_exit=True)
