"""The Makefile's `make train`: the commands it runs, the workdir it names (`make -n`), and its
one line where there is no data."""
import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.integration  # every test starts make (a subprocess)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Make reads these from the environment too (`?=`, a parent make's flags): the tests run
# the Makefile's defaults whatever started them, `make test-all` included.
_MAKE_ENV = {k: v for k, v in os.environ.items()
             if k not in ("CONFIG", "WORKDIR", "VLPRE_DATA_DIR", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def _train_commands(*args: str) -> list[str]:
  """The vlpre commands `make train ARGS` would run, from its dry run."""
  out = subprocess.run(["make", "-n", "train", *args], cwd=ROOT, capture_output=True, text=True,
                       check=True, env=_MAKE_ENV).stdout
  return [line.split("XLA_FLAGS= ", 1)[1].split(" -m ", 1)[1]
          for line in out.splitlines() if " -m vlpre." in line]


def test_make_train_is_lift_against_minilm_in_its_own_workdir():
  assert _train_commands() == [
      "vlpre.embed --config=configs/lift.py:tiny,minilm --workdir=workdirs/lift_minilm",
      "vlpre.main --config=configs/lift.py:tiny,minilm --workdir=workdirs/lift_minilm"]


@pytest.mark.parametrize("config,workdir", [
    ("configs/lift.py:tiny", "workdirs/lift"),          # the frozen SmolLM2 run
    ("configs/lift.py:tiny,tuned", "workdirs/lift_tuned"),
    ("configs/clip.py:tiny", "workdirs/clip"),
    ("configs/clip.py", "workdirs/clip"),
    ("configs/bridge.py:tiny,finetune,freeze=last2", "workdirs/bridge_finetune_freeze=last2"),
])
def test_the_workdir_is_named_after_the_config_and_its_options(config, workdir):
  """Two runs of one config file with other options never share (and so never resume) a workdir."""
  assert _train_commands(f"CONFIG={config}")[-1] == f"vlpre.main --config={config} --workdir={workdir}"


def test_an_explicit_workdir_wins():
  assert _train_commands("WORKDIR=/tmp/w")[-1] == \
      "vlpre.main --config=configs/lift.py:tiny,minilm --workdir=/tmp/w"


def test_without_data_make_train_stops_with_one_line_naming_make_data(tmp_path):
  """A checkout with no ../shared/data beside it and nothing fetched: one line, before any
  install or run."""
  checkout = tmp_path / "vlpre"
  checkout.mkdir()
  shutil.copy(os.path.join(ROOT, "Makefile"), checkout)
  out = subprocess.run(["make", "train"], cwd=checkout, capture_output=True, text=True,
                       env=_MAKE_ENV)
  assert out.returncode != 0
  assert out.stderr.splitlines()[0] == (
      f"no data at {checkout}/workdirs/data (../shared/data is absent): run make data "
      "(or set VLPRE_DATA_DIR)")
  assert not (checkout / ".venv").exists()
