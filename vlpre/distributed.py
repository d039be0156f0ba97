"""Multi-process runs: `jax.distributed` initialised from flags, the environment or the cluster.

A multi-host run is one `python -m vlpre.main` process per host (a TPU VM worker, a SLURM
node) or per GPU, all with the same arguments. `initialize` runs in `vlpre.main`,
`vlpre.evaluate` and `vlpre.embed` (their `Flags`) before any other JAX call. How the run
is found, first match wins:

  1. explicit: `--coordinator_address`, `--num_processes`, `--process_id`, or the
     environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (a flag wins over its variable); all three are needed. Process 0 starts the
     coordinator on the address's port; the others connect to it.
  2. VLPRE_MULTIHOST=1 (set by launch/tpu_vm.sh and launch/slurm.sbatch):
     `jax.distributed.initialize()` with no arguments, which reads the cluster: Cloud TPU
     metadata on a TPU VM pod, SLURM's variables (SLURM_JOB_ID, SLURM_NTASKS,
     SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST) under `srun`, Open MPI's under
     `mpirun`. Values of 1. still apply (e.g. only JAX_COORDINATOR_ADDRESS).
  3. `srun` with more than one task (SLURM_STEP_NUM_TASKS > 1): as 2.

Otherwise the run is a single process and nothing is initialised.

Every problem is one line (`DistributedError`, exit 1 in `vlpre.main`): an incomplete
or malformed setting, a process id out of range, a coordinator port already taken, a
process count that disagrees with the run it joined, and a run that did not assemble in
`timeout_s` seconds (the coordinator unreachable, or fewer processes started than
announced). JAX itself aborts the process on a failed connection, so that last case is
caught by a watchdog that fires before JAX's own deadline.

After initialising, processes other than 0 log warnings and errors only: process 0
writes the progress lines, metrics.jsonl and TensorBoard; every process takes part in
each checkpoint (orbax writes each process's shards and data-iterator state).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import socket
import sys
import threading
from typing import Mapping

from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

ENV_ADDRESS, ENV_NUM, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# JAX's own connection deadline is this much later than the watchdog's, so that the
# watchdog's line is what a failed start prints.
_JAX_DEADLINE_MARGIN_S = 30


class DistributedError(RuntimeError):
  """A multi-process launch that cannot work; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """What `detect` found. All None with `auto`: JAX reads the cluster's environment."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  auto: bool

  def describe(self) -> str:
    if self.num_processes is None:
      return "the multi-process run (parameters from the cluster environment)"
    return (f"the {self.num_processes}-process run at {self.coordinator_address} as process "
            f"{self.process_id}")


def _int(name: str, value: str | int | None) -> int | None:
  if value is None or isinstance(value, int):
    return value
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None,
           env: Mapping[str, str] | None = None) -> Launch | None:
  """The multi-process launch that flags and environment describe, or None (one process)."""
  env = os.environ if env is None else env
  address = coordinator_address or env.get(ENV_ADDRESS) or None
  num = _int(f"--num_processes / {ENV_NUM}",
             num_processes if num_processes is not None else env.get(ENV_NUM) or None)
  pid = _int(f"--process_id / {ENV_ID}",
             process_id if process_id is not None else env.get(ENV_ID) or None)
  auto = env.get("VLPRE_MULTIHOST", "") not in ("", "0") or (
      _int("SLURM_STEP_NUM_TASKS", env.get("SLURM_STEP_NUM_TASKS") or None) or 1) > 1
  given = {"coordinator address (--coordinator_address / JAX_COORDINATOR_ADDRESS)": address,
           "number of processes (--num_processes / JAX_NUM_PROCESSES)": num,
           "process id (--process_id / JAX_PROCESS_ID)": pid}
  if not auto and not any(v is not None for v in given.values()):
    return None
  if not auto and any(v is None for v in given.values()):
    missing = [name for name, v in given.items() if v is None]
    raise DistributedError(
        f"multi-process launch: {' and '.join(missing)} missing; give all three, or set "
        f"VLPRE_MULTIHOST=1 to read them from the cluster (TPU pod, SLURM)")
  if num is not None and num < 1:
    raise DistributedError(f"number of processes must be at least 1, got {num}")
  if num is not None and pid is not None and not 0 <= pid < num:
    raise DistributedError(f"process id {pid} is not in [0, {num}) for {num} processes")
  if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
    raise DistributedError(f"coordinator address {address!r} is not HOST:PORT")
  return Launch(address, num, pid, auto)


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
  host, port = address.rsplit(":", 1)
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
      return True
  except OSError:
    return False


def _port_taken(port: int) -> bool:
  """Whether something listens on `port` here (JAX's coordinator would crash binding it)."""
  families = [(socket.AF_INET, "")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
  for family, host in families:
    try:
      with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        s.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        return True
  return False


def _watchdog(launch: Launch, timeout_s: float) -> threading.Timer:
  """Exits with one line if the run has not assembled after `timeout_s` seconds."""

  def fire():
    address = launch.coordinator_address
    if address and launch.process_id != 0 and not _reachable(address):
      why = f"the coordinator {address} is unreachable: start process 0 there, or fix the address"
    else:
      count = f"all {launch.num_processes}" if launch.num_processes else "all"
      why = (f"not {count} processes joined: start each with the same coordinator address and "
             f"number of processes and its own process id")
    print(f"vlpre: could not join {launch.describe()} within {timeout_s:g} s: {why}",
          file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access  # JAX's client would abort() later

  timer = threading.Timer(timeout_s, fire)
  timer.daemon = True
  return timer


class Flags:
  """The multi-process flags of the vlpre commands that touch devices (vlpre.main,
  vlpre.evaluate, vlpre.embed): construct once in the command's module (it defines the
  absl flags), then call `initialize` first thing in its main."""

  def __init__(self):
    self.coordinator = flags.DEFINE_string(
        "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0's "
        f"coordinator (default ${ENV_ADDRESS}). See vlpre/distributed.py.")
    self.num_processes = flags.DEFINE_integer(
        "num_processes", None, f"Multi-process runs: how many (default ${ENV_NUM}).")
    self.process_id = flags.DEFINE_integer(
        "process_id", None, "Multi-process runs: this process's id in [0, num_processes) "
        f"(default ${ENV_ID}).")
    self.timeout_s = flags.DEFINE_float(
        "distributed_timeout_s", 300, "Multi-process runs: seconds to wait for every process "
        "to join before exiting with an error.")

  def initialize(self) -> None:
    """`initialize(detect(...))` from these flags; a problem is one line and exit 1."""
    try:
      initialize(detect(self.coordinator.value, self.num_processes.value, self.process_id.value),
                 timeout_s=self.timeout_s.value)
    except DistributedError as e:
      print(f"vlpre: {e}", file=sys.stderr)
      sys.exit(1)


def initialize(launch: Launch | None, timeout_s: float = 300) -> None:
  """`jax.distributed.initialize` for `launch` (from `detect`); nothing for None."""
  if launch is None:
    return
  if launch.process_id == 0 and _port_taken(int(launch.coordinator_address.rsplit(":", 1)[1])):
    raise DistributedError(f"could not join {launch.describe()}: port "
                           f"{launch.coordinator_address.rsplit(':', 1)[1]} is taken on this host")
  watchdog = _watchdog(launch, timeout_s)
  watchdog.start()
  try:
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address, num_processes=launch.num_processes,
        process_id=launch.process_id,
        initialization_timeout=int(timeout_s) + _JAX_DEADLINE_MARGIN_S)
  except Exception as e:  # pylint: disable=broad-exception-caught
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DistributedError(f"could not join {launch.describe()}: {reason}") from e
  finally:
    watchdog.cancel()
  if launch.num_processes is not None and jax.process_count() != launch.num_processes:
    raise DistributedError(
        f"process {launch.process_id} was started for {launch.num_processes} processes, but "
        f"the run at {launch.coordinator_address} has {jax.process_count()}: give every "
        f"process the same number")
  logging.info("process %d of %d: %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_index() != 0:  # process 0 speaks for the run
    logging.set_verbosity(logging.WARNING)


_TEXT_BYTES = 2048  # what `broadcast_text` carries: one line of an error message


def broadcast_text(text: str) -> str:
  """Process 0's `text` on every process (a one-line message, cut to 2 KB); as is when
  the run is a single process."""
  if jax.process_count() == 1:
    return text
  data = np.zeros(_TEXT_BYTES, np.uint8)
  encoded = text.encode("utf-8")[:_TEXT_BYTES]
  data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(data).rstrip(b"\0").decode("utf-8", errors="replace")


def from_process_0(value: int | bool | None) -> int | bool | None:
  """Process 0's answer on every process (e.g. the step to resume from: each process
  reading the directory itself could see another state of a shared filesystem)."""
  if jax.process_count() == 1:
    return value
  code = -1 if value is None else int(value)
  if code < -1:
    raise ValueError(f"from_process_0 takes None, a bool or an int >= 0, got {value}")
  agreed = int(multihost_utils.broadcast_one_to_all(np.int64(code)))
  return None if agreed == -1 else (bool(agreed) if isinstance(value, bool) else agreed)


def processes_where(flag: bool) -> list[int]:
  """The indices of the processes that passed a true `flag`, known to every process; []
  in a single-process run where `flag` is false."""
  if jax.process_count() == 1:
    return [0] if flag else []
  flags_ = np.asarray(multihost_utils.process_allgather(np.array([bool(flag)]))).reshape(-1)
  return [int(i) for i in np.flatnonzero(flags_)]
