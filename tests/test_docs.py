"""The docs' claims that name tests name tests that exist."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _test_functions(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text(encoding="utf-8"))
  return {node.name for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.name.startswith("test_")}


def _rows(markdown: str) -> list[list[str]]:
  """The body rows of the markdown tables in `markdown`, as lists of cells."""
  rows = []
  for line in markdown.splitlines():
    if line.startswith("|") and not re.match(r"\|\s*-", line):
      rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
  return [row for row in rows if row[0] not in ("fault",)]  # the header row


def test_the_failure_table_names_tests_that_exist():
  """Each row of docs/reliability.md's failure table names at least one test, and every
  test it names (`file.py::test_name[...]`, or `test_name` of the file named before it in
  the cell) is a test function of that file."""
  rows = _rows((ROOT / "docs" / "reliability.md").read_text(encoding="utf-8"))
  assert len(rows) > 40
  functions: dict[str, set[str]] = {}
  missing = []
  for row in rows:
    fault, cell = row[0], row[-1]
    named = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)?(?:\[[^\]]*\])?`", cell)
    assert any(name for _, name in named), f"row {fault!r} names no test"
    current = None
    for file, name in named:
      current = file or current
      if not name:
        continue  # `[param]`: another case of the test named before it
      assert current, f"row {fault!r}: {name} comes before any file"
      if current not in functions:
        functions[current] = _test_functions(ROOT / "tests" / current)
      if name not in functions[current]:
        missing.append(f"{current}::{name} ({fault})")
  assert not missing, missing
