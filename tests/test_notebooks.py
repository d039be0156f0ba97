"""The notebooks in notebooks/ run end to end with tiny parameters, so they cannot rot.

Each notebook is executed in a fresh Jupyter kernel (nbclient) with tiny values injected
after its `parameters` cell, papermill-style; the test then reads what its runs wrote
(metrics.jsonl) and checks the notebook drew its pictures. The committed files must be
exactly what notebooks/build_notebooks.py writes, and carry no outputs.

The kernel sees one CPU device (a Colab runtime has one accelerator; the 8 fake devices
of the rest of the suite would only slow these runs down), and compiled programs are
cached on disk across runs ($VLPRE_NOTEBOOK_JAX_CACHE, default workdirs/jax_cache_notebooks).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import pathlib
import re
import time

import pytest

from vlpre import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

def _build_module():
  spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


BUILD = _build_module()
# Each notebook's tiny parameters and what its runs must have written: its method's
# notebook.py (TINY, TINY_EXPECTS: run folder under WORKDIR → eval metrics that must be
# there at the end; TINY_LEARNS: the run folders whose loss must fall, default all of them).
TINY = {name: (module.TINY, module.TINY_EXPECTS,
               getattr(module, "TINY_LEARNS", tuple(module.TINY_EXPECTS)))
        for name, module in BUILD.NOTEBOOKS.items()}


def test_notebooks_are_built_and_stripped():
  nbformat = importlib.import_module("nbformat")
  assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(BUILD.NOTEBOOKS)
  for name in BUILD.NOTEBOOKS:
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, f"{path}: outputs not stripped"
    assert path.read_text(encoding="utf-8") == BUILD.render(name), (
        f"{path} differs from notebooks/build_notebooks.py: rerun it")
    assert BUILD.colab_url(name) in nb.cells[0].source
    assert sum("parameters" in c.metadata.get("tags", ()) for c in nb.cells) == 1


def test_the_repository_is_one_setting_and_gpu_runtimes_install_cuda():
  """The badges (here and in docs/notebooks.md) and the clone all follow REPOSITORY; the
  install cell adds the [cuda] extra where the runtime has a GPU."""
  assert BUILD.REPOSITORY.startswith("https://github.com/") and BUILD.REPOSITORY.count("/") == 4
  docs = (ROOT / "docs" / "notebooks.md").read_text(encoding="utf-8")
  linked = set(re.findall(r"\(https://colab\.research\.google\.com/github/[^)]+\)", docs))
  assert linked == {f"({BUILD.colab_url(name)})" for name in BUILD.NOTEBOOKS}
  for name in BUILD.NOTEBOOKS:
    install = next(c.source for c in BUILD.build(name).cells if "!git clone" in c.source)
    assert f"!git clone -q --branch {BUILD.BRANCH} {BUILD.REPOSITORY}.git" in install
    assert 'EXTRA = "[cuda]" if shutil.which("nvidia-smi") else ""' in install
    assert '!pip install -q -e "/content/vlpre{EXTRA}"' in install


def execute(name: str, parameters: dict, workdir: str, timeout: int = 900):
  """Runs notebooks/<name>.ipynb with `parameters` injected; returns the executed notebook."""
  nbformat = importlib.import_module("nbformat")
  nbclient = importlib.import_module("nbclient")
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ()))
  source = "\n".join(f"{k} = {v!r}" for k, v in {**parameters, "WORKDIR": workdir}.items())
  injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, injected)
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
      "VLPRE_NOTEBOOK_JAX_CACHE", str(ROOT / "workdirs" / "jax_cache_notebooks"))
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute(env=env)
  return nb


def _images(nb) -> int:
  return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "image/png" in o.get("data", {}))


@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_runs(name, tmp_path):
  parameters, expected, learns = TINY[name]
  start = time.perf_counter()
  nb = execute(name, parameters, str(tmp_path / name))
  print(f"notebooks/{name}.ipynb: {time.perf_counter() - start:.0f} s")
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  assert _images(nb) >= 2, "the notebook drew no curves / examples"
  for run_dir, keys in expected.items():
    run = compare.read_run(str(tmp_path / name / run_dir))
    losses = [row["loss"] for row in run.training_rows()]
    assert losses and all(math.isfinite(v) for v in losses), (run_dir, losses)
    last = {k: v for row in run.rows for k, v in row.items()}
    for key in keys:
      assert key in last and math.isfinite(last[key]), f"{run_dir}: no {key} in {sorted(last)}"
  # Learning happened: the last training loss is below the first (a staged run's stages
  # concatenated).
  for run_dir in learns:
    run = compare.read_run(str(tmp_path / name / run_dir))
    losses = [row["loss"] for row in run.training_rows()]
    assert losses[-1] < losses[0], f"{run_dir}: the loss did not fall: {losses}"
