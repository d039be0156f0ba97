"""Test set-up: 8 fake CPU devices so every sharding code path runs on a laptop."""
import os

import pathlib

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
from vlpre.data import tokenizers
from vlpre.llm import assets
from vlpre.text_encoders import store

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir():
  if not DATA_DIR.exists():
    raise FileNotFoundError(f"tests read the shared data from {DATA_DIR}; it is missing")
  return str(DATA_DIR)


def pytest_configure(config):
  del config
  assert jax.device_count() == 8, "tests expect 8 fake devices (XLA_FLAGS)"


@pytest.fixture(autouse=True, scope="module")
def _release_caches_after_each_file():
  """Each test file starts from empty in-memory caches: compiled programs (the persistent
  cache above makes recompiling cheap) and the per-process model loaders, so the suite's
  memory does not grow with every file it has run."""
  yield
  jax.clear_caches()
  for loader in (llm.load, assets._read_resolved, store._load_encoder,  # pylint: disable=protected-access
                 tokenizers._build_clip_hf_tokenizer):  # pylint: disable=protected-access
    loader.cache_clear()
