"""How the package is layered: no import cycles, imports at the top of the file (an import
inside a function only for an optional heavy dependency, with its reason), and no method
named in the method-agnostic core."""
import ast
import os
import pathlib
import re
import subprocess
import sys

from vlpre import methods

PACKAGE = pathlib.Path(methods.__file__).resolve().parents[1]
ROOT = PACKAGE.parent

# Optional or heavy dependencies a function may import where it needs them: a run that
# never reaches that function never pays for (or needs) the import.
LAZY_OK = ("torch", "transformers", "matplotlib", "tensorflow_datasets", "tensorboardX",
           "huggingface_hub", "gguf", "pyarrow", "wandb")

# The method-agnostic core: no method is named here, not even in a comment.
CORE = ("train.py", "accumulate.py", "stages.py", "checkpoint.py", "sharding.py", "optim.py",
        "metrics.py", "storage.py", "check.py", "export.py", "compare.py", "run_record.py",
        "profiling.py", "data", "weights")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imports(tree: ast.AST, modules: dict) -> list[tuple[ast.AST, str]]:
  """(node, vlpre module) for every import of a vlpre module anywhere in the file."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node, a.name) for a in node.names if a.name in modules]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        child = f"{node.module}.{alias.name}"
        if child in modules:
          found.append((node, child))
        elif node.module in modules:
          found.append((node, node.module))
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: {target for _, target in _imports(ast.parse(path.read_text()), modules)} - {name}
          for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
  """Imports anywhere in a file count, those inside functions too."""
  assert _cycle(_graph()) is None


def _function_imports(path: pathlib.Path) -> list[tuple[int, str, str]]:
  """(line, imported module, the line's text) of every import inside a def."""
  tree, lines = ast.parse(path.read_text()), path.read_text().splitlines()
  found = []
  for func in ast.walk(tree):
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    for node in ast.walk(func):
      if isinstance(node, ast.Import):
        found += [(node.lineno, a.name, lines[node.lineno - 1]) for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        found.append((node.lineno, node.module or "", lines[node.lineno - 1]))
  return sorted(set(found))


def test_imports_inside_functions_are_optional_heavy_dependencies_with_a_reason():
  problems = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for line, module, text in _function_imports(path):
      where = f"{path.relative_to(ROOT)}:{line}"
      if not any(module == ok or module.startswith(ok + ".") for ok in LAZY_OK):
        problems.append(f"{where}: {module} is imported inside a function")
      elif not re.sub(r"pylint: disable=\S+", "", text.partition("#")[2]).strip():
        problems.append(f"{where}: {module} imported inside a function without a reason")
  assert not problems, "\n".join(problems)


def test_no_method_is_named_in_the_core():
  names = set()
  for method in methods.all_methods():
    names |= {method.name, *method.aliases}
  names -= {"lm", "classifier"}  # words of their own: a language model, a classifier
  pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b", re.I)
  problems = []
  for entry in CORE:
    for path in sorted((PACKAGE / entry).rglob("*.py") if (PACKAGE / entry).is_dir()
                       else [PACKAGE / entry]):
      for number, text in enumerate(path.read_text().splitlines(), start=1):
        if match := pattern.search(text):
          problems.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}: {text.strip()}")
  assert not problems, "\n".join(problems)


def test_every_module_imports_alongside_every_other():
  """One process imports all of vlpre: a module that defines an absl flag on import (rather
  than under `if __name__ == "__main__":`) collides with any other module defining the same
  name, and fails whichever test happens to import both."""
  names = sorted(_modules())
  code = ("import importlib, sys\n"
          "for name in sys.argv[1:]:\n"
          "  try:\n"
          "    importlib.import_module(name)\n"
          "  except Exception as e:\n"
          "    print(f'{name}: {type(e).__name__}: {e}')\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=True)
  assert not result.stdout.strip(), result.stdout


def test_the_trainer_imports_without_torch_and_torch_still_imports():
  """tensorboardX imports torch when it is installed; vlpre/__init__.py keeps that out of
  every vlpre process (1.5 s and ~180 MB each), and `import torch` still works after."""
  code = ("import sys\n"
          "import vlpre.main, vlpre.evaluate, vlpre.metrics, vlpre.storage\n"
          "print('torch' in sys.modules)\n"
          "import torch, tensorboardX\n"
          "print(torch.ones(2).sum().item(), hasattr(tensorboardX, 'SummaryWriter'))\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  assert result.stdout.splitlines() == ["False", "2.0 True"], result.stdout + result.stderr
