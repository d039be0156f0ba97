"""Test set-up: 8 fake CPU devices so every sharding code path runs on a laptop."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir():
  if not DATA_DIR.exists():
    raise FileNotFoundError(f"tests read the shared data from {DATA_DIR}; it is missing")
  return str(DATA_DIR)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs (seconds to minutes)")
  assert jax.device_count() == 8, "tests expect 8 fake devices (XLA_FLAGS)"
