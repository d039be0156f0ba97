"""Test set-up: 8 fake CPU devices so every sharding code path runs on a laptop."""
import os
import pathlib
import resource

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the run, inherited by the subprocesses the
# tests start: the same tiny train steps and evaluators, built anew by each train.run,
# compile once. Keyed by the program and the jax/XLA version, so it is never stale.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(
    pathlib.Path(__file__).resolve().parents[1] / "workdirs" / "jax_cache_tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax
import pytest

from vlpre import llm
from vlpre import train
from vlpre.data import tokenizers
from vlpre.llm import assets
from vlpre.text_encoders import store

ROOT = pathlib.Path(__file__).resolve().parents[1]
# vlpre's own default (vlpre.data.sources.resolve_data_dir): $VLPRE_DATA_DIR (the Makefile
# sets it to what `make data` built where ../shared/data is absent), else ../shared/data.
DATA_DIR = pathlib.Path(os.environ.get("VLPRE_DATA_DIR") or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir():
  if not DATA_DIR.exists():
    raise FileNotFoundError(f"tests read the data from {DATA_DIR}; it is missing: run make data")
  return str(DATA_DIR)


def system_data_skip_reason(path: str, package: str, environ=os.environ) -> str | None:
  """Why a `system_data(path, package)` test skips: the system package is not installed,
  outside CI (`CI` set, as .ci/run's runner does). CI installs it, so there a missing
  package fails the test instead of skipping it."""
  if environ.get("CI") or os.path.exists(path):
    return None
  return (f"{path} is missing: apt-get install {package} (or make fashion-mnist); "
          "CI installs it and runs this test")


def pytest_runtest_setup(item):
  marker = item.get_closest_marker("system_data")
  if marker is not None and (reason := system_data_skip_reason(*marker.args)):
    pytest.skip(reason)


def pytest_configure(config):
  del config
  assert jax.device_count() == 8, "tests expect 8 fake devices (XLA_FLAGS)"


@pytest.fixture(autouse=True, scope="module")
def _release_caches_after_each_file():
  """Each test file starts from empty in-memory caches: compiled programs (the persistent
  cache above makes recompiling cheap) and the per-process model loaders, so the suite's
  memory does not grow with every file it has run."""
  yield
  for loader in (llm._load, assets._read_resolved, store._load_encoder,  # pylint: disable=protected-access
                 tokenizers._build_clip_hf_tokenizer):  # pylint: disable=protected-access
    loader.cache_clear()
  train.release_host_memory()  # then JAX's compiled programs, and glibc's freed arenas


# The files whose tests hold a real LLM or a whole staged run in memory (several GB each):
# under `pytest -n 2` (make test, make test-all) they run one after another on one worker, so
# two of them never add up. Every other file is a unit of its own, sent to whichever worker is
# free; a file stays on one worker, so its module fixtures are built once.
# A test id (file::name) counts on its own: the HIVE notebook's kernel peaks near 8 GB.
MEMORY_HEAVY = ("test_llm_train.py", "test_hive.py", "test_bridge.py", "test_lift.py",
                "test_lcl.py", "test_gpt4image.py", "test_text_encoders.py", "test_llm.py",
                "test_text_embedder.py", "test_export.py", "test_weights.py",
                "test_compile.py",  # the TPU compiler: ~6 GB for a full-size step
                "test_notebooks.py::test_notebook_runs[hive]")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the mark
def pytest_collection_modifyitems(config, items):
  """Groups each test for pytest-xdist's --dist loadgroup: MEMORY_HEAVY files share one
  group; each notebook is a group of its own (a minute or more each, no shared fixture);
  every other file is its own. xdist hands the groups out largest (most tests) first, so
  the memory-heavy group starts at once and the notebooks come last."""
  del config
  for item in items:
    if item.path.name in MEMORY_HEAVY or f"{item.path.name}::{item.name}" in MEMORY_HEAVY:
      group = "memory_heavy"
    elif item.get_closest_marker("notebook"):
      group = item.nodeid
    else:
      group = item.path.name
    item.add_marker(pytest.mark.xdist_group(group))


def _rss_gb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _file_peak_gb() -> float:
  """This process's peak resident size since `_reset_file_peak` (Linux's VmHWM)."""
  with open("/proc/self/status") as f:
    kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
  return kb / 2**20


def _reset_file_peak() -> None:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current resident size
  except OSError:
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With VLPRE_TEST_MEMORY_LOG=FILE: a line per test file when it ends, with this process's
  peak resident size during the file, its resident size after it, and the largest child
  process's peak so far (lines of several workers interleave; each names its worker)."""
  log = os.environ.get("VLPRE_TEST_MEMORY_LOG")
  first = getattr(pytest_runtest_protocol, "last_path", None) != item.path
  if log and first:
    _reset_file_peak()
  pytest_runtest_protocol.last_path = item.path
  yield
  if log and (nextitem is None or nextitem.path != item.path):
    gb = 2**20  # ru_maxrss is in KiB
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(log, "a") as f:
      f.write(f"{item.path.name}\t{worker}\tfile_peak_GB={_file_peak_gb():.2f}\t"
              f"rss_after_GB={_rss_gb():.2f}\t"
              f"children_peak_GB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / gb:.2f}\n")
