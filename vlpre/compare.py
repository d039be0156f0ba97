"""Runs side by side: one table of every evaluation (markdown + CSV) and PNG curves.

    python -m vlpre.compare --workdirs=workdirs/compare/run_a,workdirs/compare/run_b \
        [--names=A,B] [--out=workdirs/compare] [--baseline=A]

Seeds: runs given the same name (--names=A,A,A,B,B,B) are one setting at several seeds;
compare.md then adds a table of each name's mean ± sample std, and with --baseline=A each
other name's paired differences from A, run by run of the same config.seed
(compare_seeds.csv holds the same).

`make compare` is the other form: every method's comparison runs (each method folder's
`METHOD.compare`, vlpre.methods.CompareRun), in their `order`, each command run as
`python -m ...` (each resumes or skips what is done, so a rerun picks up where it
stopped), then the table of them all, written into --out:

    python -m vlpre.compare --run --steps=300 --out=workdirs/compare \
        [--option=METHOD.NAME=VALUE ...] [--dry_run]

`--option=METHOD.NAME=VALUE` fills that method's `{opt:NAME...}` / `{arg:NAME}`
placeholders; `--dry_run` prints the commands, one per line, shell-quoted, and runs none.

Writes into --out (default: the folder the workdirs sit in) and prints compare.md:
  compare.md, compare.csv  one row per run: `steps` (the last training step), `loss` (the
                           last training loss), `train_time_s`, then the LAST value of
                           every eval metric that any run logged; blank where a run has none
  compare_config.csv       the config fields that differ between the runs (below)
  loss.png                 training loss vs step, one line per run (log y when it spans >10×)
  eval_<metric>.png        one per eval metric evaluated at ≥2 steps in some run

Which keys are eval metrics: every key of a metrics.jsonl line without "loss". The trainer
writes each evaluator's results as a line of their own and every training line carries
"loss" (train.run), so this takes in every evaluator (retrieval_*, zeroshot_*,
linear_probe*, classify, captioning, attentive_probe, ...) and none of the per-step
training metrics (clip/..., lm/..., softmax_ce/..., perf/..., input/...), whatever their
names. It reads the raw lines for this (`metrics.read_lines`; `metrics.read_metrics`
merges a step's lines, and an evaluation at the last step shares that step with a
training line). A workdir's metrics_eval.jsonl (vlpre.evaluate's rows) counts as well.

Units: values are as logged, in the CSV and the markdown alike (markdown rounds to 4
significant digits): R@k, top-k and accuracies are fractions in [0, 1]; captioning's
bleu4 / cider are ×100 (that evaluator's own scale). `loss` is each method's own objective,
so it compares a run with itself over time, not methods with each other. `train_time_s` is
not logged as such: it is Σ perf/seconds_per_step × steps over the logged training lines,
i.e. the training loop's time (mid-run evaluations and checkpoints included, set-up and
the evaluations before the first / after the last step not), blank without perf/ metrics.

Config fields that differ: for runs that recorded their config (`<workdir>/config.json`,
vlpre/run_record.py), compare.md ends with a table of every field whose value differs
between them (the first 25; compare_config.csv has all), leaving out the fields that never
change a run (`run_record.RESUMABLE`: evaluators, logging, checkpoints, mesh).

Workdirs and --out are local paths or gs:// URIs (read and written through epath); a
line of metrics.jsonl cut off by a kill -9 is skipped (`metrics.read_lines`).

A staged run (vlpre/stages.py: `<workdir>/<i>_<name>/metrics.jsonl`) is read as one run:
its stages in order, each stage's steps offset by the steps of the stages before it, so
curves run on; evaluations at step 0 of the first stage stay at step 0 ("before"). The
plots mark where each later stage starts with a dotted line.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from typing import Sequence

from etils import epath
from matplotlib.figure import Figure  # no pyplot: Agg renders the PNGs, no global backend

from vlpre import methods
from vlpre import metrics as metrics_lib
from vlpre import run_record
from vlpre import storage

_STAGE_DIR = re.compile(r"(\d+)_.+")


@dataclasses.dataclass
class Run:
  """One run's metrics, stages concatenated: rows on one step axis, eval keys in order."""
  name: str
  rows: list[dict]         # one dict per step (lines of a step merged), steps ascending
  eval_keys: list[str]     # first-seen order, so an evaluator's keys stay together
  stage_starts: list[int]  # the global step where each stage after the first begins
  config: dict | None = None  # the config the run recorded (vlpre.run_record); None: none

  def series(self, key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in self.rows if key in row]

  def training_rows(self) -> list[dict]:
    return [row for row in self.rows if "loss" in row]


def _metric_dirs(workdir: str) -> list[epath.Path]:
  """[workdir] for a plain run; its stage folders in stage order for a staged one."""
  root = storage.path(workdir, what="workdir")
  if (root / "metrics.jsonl").exists():
    return [root]
  names = [p.name for p in root.iterdir()] if root.is_dir() else []
  stages = [d for d in names if _STAGE_DIR.fullmatch(d) and (root / d / "metrics.jsonl").exists()]
  if not stages:
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl, nor stage folders <i>_<name>/ "
                            "holding one")
  stages.sort(key=lambda d: int(_STAGE_DIR.fullmatch(d).group(1)))
  return [root / d for d in stages]


def read_run(workdir: str, name: str | None = None) -> Run:
  """Reads a plain or staged run's metrics and recorded config (module docstring)."""
  merged: dict[int, dict] = {}
  eval_keys: dict[str, None] = {}  # an ordered set
  starts, offset = [], 0
  for directory in _metric_dirs(workdir):
    starts.append(offset)
    lines = metrics_lib.read_lines(os.fspath(directory))  # cut-off lines skipped
    for line in lines:  # later lines of a step win, as in metrics.read_metrics
      step = offset + line["step"]
      merged.setdefault(step, {}).update(line, step=step)
      if "loss" not in line:
        eval_keys.update(dict.fromkeys(k for k in line if k != "step"))
    offset += max((line["step"] for line in lines), default=0)
  record = run_record.read(workdir)
  return Run(name or storage.path(workdir, what="workdir").name,
             [merged[s] for s in sorted(merged)], list(eval_keys), starts[1:],
             record["config"] if record else None)


def config_differences(runs: list[Run]) -> tuple[list[str], list[list]]:
  """The header and one row per config field whose recorded value differs between the
  runs that recorded one (fields that never change a run, `run_record.RESUMABLE`, left
  out); values as JSON, blank where a run has no such field or no record."""
  flat = {i: run_record.flatten(run.config) for i, run in enumerate(runs)
          if run.config is not None}
  fields = list(dict.fromkeys(f for values in flat.values() for f in values))
  header = ["field", *(run.name for run in runs)]
  body = []
  for field in fields:
    if run_record.is_allowed(field, run_record.RESUMABLE):
      continue
    values = [json.dumps(flat[i][field]) if i in flat and field in flat[i] else ""
              for i in range(len(runs))]
    if len(flat) > 1 and len({values[i] for i in flat}) > 1:
      body.append([field, *values])
  return header, body


def _train_time(run: Run) -> float | None:
  """Σ perf/seconds_per_step × (steps since the previous logged training line)."""
  total, previous, seen = 0.0, 0, False
  for row in run.training_rows():
    if "perf/seconds_per_step" in row:
      total += row["perf/seconds_per_step"] * (row["step"] - previous)
      seen = True
    previous = row["step"]
  return total if seen else None


def table(runs: list[Run]) -> tuple[list[str], list[list[float | int | str | None]]]:
  """The header and one row per run: run, steps, loss, train_time_s, eval metrics."""
  metrics = list(dict.fromkeys(k for run in runs for k in run.eval_keys))
  header = ["run", "steps", "loss", "train_time_s", *metrics]
  body = []
  for run in runs:
    train = run.training_rows()
    last = {k: points[-1][1] for k in metrics if (points := run.series(k))}
    body.append([run.name, train[-1]["step"] if train else None,
                 train[-1]["loss"] if train else None, _train_time(run),
                 *(last.get(k) for k in metrics)])
  return header, body


def _mean_std(values: list) -> str | None:
  """"mean ± sample standard deviation" (4 and 2 significant digits); the value alone for
  one; None for none."""
  values = [v for v in values if v is not None]
  if len(values) < 2:
    return f"{values[0]:.4g}" if values else None
  return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def _seed(run: Run):
  return (run.config or {}).get("seed")


def across_seeds(runs: list[Run], baseline: str | None = None
                 ) -> tuple[list[str], list[list[str | int | None]]]:
  """Runs sharing a name are one setting at several seeds. The header and one row per name:
  its number of runs and, for each `table` column from `loss` on, the mean ± sample std of
  the runs' last values. With `baseline` (a name), then one row per other name: its paired
  differences from the baseline's run of the same seed (each run's recorded config.seed),
  mean ± std over the seeds both have."""
  header, body = table(runs)
  columns = header[2:]
  groups: dict[str, list[tuple[Run, list]]] = {}
  for run, row in zip(runs, body):
    groups.setdefault(run.name, []).append((run, row[2:]))
  if baseline is not None and baseline not in groups:
    raise ValueError(f"--baseline {baseline!r} is none of the runs' names {sorted(groups)}")
  out = [[name, len(members), *(_mean_std([row[i] for _, row in members])
                                for i in range(len(columns)))]
         for name, members in groups.items()]
  if baseline is not None:
    base = {_seed(run): row for run, row in groups[baseline]}
    for name, members in groups.items():
      pairs = [(row, base[_seed(run)]) for run, row in members
               if name != baseline and _seed(run) in base]
      if pairs:
        out.append([f"{name} − {baseline}", len(pairs), *(
            _mean_std([a[i] - b[i] for a, b in pairs if a[i] is not None and b[i] is not None])
            for i in range(len(columns)))])
  return ["runs", "n", *columns], out


def _cell(column: str, value) -> str:
  """A markdown cell: blank for a missing value, 4 significant digits, whole seconds."""
  if value is None:
    return ""
  if isinstance(value, str) or column == "steps":
    return str(value).replace("|", "\\|")  # a regex in a config value stays in its cell
  return f"{value:.0f}" if column == "train_time_s" else f"{value:.4g}"


def markdown(header: list[str], body: list[list]) -> str:
  """`table`'s header and rows as a markdown table (the CSV keeps full precision)."""
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  lines += ["| " + " | ".join(_cell(c, v) for c, v in zip(header, row)) + " |" for row in body]
  return "\n".join(lines)


_UNITS = ("Last value of each eval metric, as logged: R@k / top-k / accuracies are fractions "
          "(0-1), captioning bleu4 / cider ×100; `loss` is the last training loss (each "
          "method's own objective); `train_time_s` = Σ perf/seconds_per_step × steps. "
          "Blank: the run has no such metric.")


_MAX_CONFIG_ROWS = 25  # in compare.md; compare_config.csv has every row


def _plot(path: epath.Path, runs: list[Run], key: str, *, marker: str | None = None,
          log_y: bool = False) -> None:
  fig = Figure(figsize=(6.4, 3.8))
  ax = fig.add_subplot()
  for run in runs:
    points = run.series(key)
    if not points:
      continue
    (line,) = ax.plot(*zip(*points), marker=marker, markersize=4, label=run.name)
    for start in run.stage_starts:
      ax.axvline(start, color=line.get_color(), linestyle=":", linewidth=0.8)
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel("step (stages concatenated)")
  ax.set_ylabel(key)
  ax.set_title(key)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()  # through epath: the folder may be in a bucket
  fig.savefig(png, format="png", dpi=120)
  path.write_bytes(png.getvalue())


def plot(runs: list[Run], out_dir: str) -> list[str]:
  """loss.png and eval_<metric>.png (metrics evaluated at ≥2 steps in some run); the paths."""
  out, paths = storage.path(out_dir, what="--out"), []
  losses = [v for run in runs for _, v in run.series("loss") if math.isfinite(v)]
  if losses:
    log_y = min(losses) > 0 and max(losses) > 10 * min(losses)
    paths.append(out / "loss.png")
    _plot(paths[-1], runs, "loss", log_y=log_y)
  for key in dict.fromkeys(k for run in runs for k in run.eval_keys):
    if any(len(run.series(key)) >= 2 for run in runs):
      paths.append(out / ("eval_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"))
      _plot(paths[-1], runs, key, marker="o")
  return [os.fspath(p) for p in paths]


def _csv(header: list[str], body: list[list]) -> str:
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(header)
  writer.writerows([["" if v is None else v for v in row] for row in body])
  return text.getvalue()


def _runs_folder(workdirs: list[str]) -> epath.Path:
  """The folder the workdirs sit in (workdirs/compare for workdirs/compare/*), local or not."""
  parents = [os.fspath(storage.path(w, what="workdir").parent) for w in workdirs]
  schemes = {p.split("://")[0] + "://" if storage.is_uri(p) else "" for p in parents}
  if len(schemes) > 1:
    raise ValueError("the workdirs are on different filesystems: give --out")
  (scheme,) = schemes
  common = os.path.commonpath([p[len(scheme):] for p in parents])
  if not common:
    raise ValueError("the workdirs share no folder: give --out")
  return storage.path(scheme + common)


def compare(workdirs: list[str], names: list[str] | None = None,
            out_dir: str | None = None, baseline: str | None = None) -> str:
  """Reads the runs, writes compare.md / compare.csv / compare_config.csv / the PNGs into
  out_dir (local or gs://); returns the markdown. Where names repeat (seeds), or with
  `baseline`, compare.md and compare_seeds.csv also hold `across_seeds`."""
  if names and len(names) != len(workdirs):
    raise ValueError(f"{len(names)} names for {len(workdirs)} workdirs")
  runs = [read_run(w, n) for w, n in zip(workdirs, names or [None] * len(workdirs))]
  out = storage.path(out_dir, what="--out") if out_dir else _runs_folder(workdirs)
  out.mkdir(parents=True, exist_ok=True)
  header, body = table(runs)
  text = f"{_UNITS}\n\n{markdown(header, body)}\n"
  if baseline is not None or len({run.name for run in runs}) < len(runs):
    seeds_header, seeds_body = across_seeds(runs, baseline)
    text += ("\nAcross seeds (runs sharing a name): mean ± sample std of the last values"
             + (f"; `X − {baseline}`: paired by config.seed" if baseline else "") + ".\n\n"
             + markdown(seeds_header, seeds_body) + "\n")
    (out / "compare_seeds.csv").write_text(_csv(seeds_header, seeds_body), encoding="utf-8")
  config_header, config_body = config_differences(runs)
  if config_body:
    more = len(config_body) - _MAX_CONFIG_ROWS
    text += (f"\nConfig fields that differ (each run's config.json):\n\n"
             f"{markdown(config_header, config_body[:_MAX_CONFIG_ROWS])}\n"
             + (f"\n{more} more in compare_config.csv\n" if more > 0 else ""))
  (out / "compare.md").write_text(text, encoding="utf-8")
  (out / "compare.csv").write_text(_csv(header, body), encoding="utf-8")
  (out / "compare_config.csv").write_text(_csv(config_header, config_body), encoding="utf-8")
  plot(runs, os.fspath(out))
  return text


# `{steps}` / `{root}` / `{dir}`, `{opt:NAME}` / `{opt:NAME=DEFAULT}` (DEFAULT may hold the
# first three), `{arg:NAME}`: the grammar of methods.CompareRun's docstring.
_PLACEHOLDER = re.compile(r"\{(?:(opt|arg):)?(\w+)(?:=((?:[^{}]|\{\w+\})*))?\}")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """A CompareRun with its placeholders filled: what `--run` executes and then compares."""
  title: str
  workdir: str
  commands: tuple[tuple[str, ...], ...]  # argv words after `python -m`


def _fill(word: str, values: dict[str, str], options: dict[str, str]) -> str:
  """`word` with its placeholders filled (methods.CompareRun's docstring)."""
  def replace(match: re.Match) -> str:
    kind, name, default = match.groups()
    if kind == "opt":
      return options[name] if name in options else _fill(default or "", values, {})
    if kind == "arg" and default is None:
      return f",{name}={options[name]}" if name in options else ""
    if kind is None and default is None and name in values:
      return values[name]
    known = ", ".join([*(f"{{{v}}}" for v in values), "{opt:NAME[=DEFAULT]}", "{arg:NAME}"])
    raise ValueError(f"unknown placeholder {match.group(0)} in {word!r}; known: {known}")
  return _PLACEHOLDER.sub(replace, word)


def _option_names(method: methods.Method) -> set[str]:
  """The names of a method's `{opt:NAME...}` / `{arg:NAME}` placeholders."""
  return {m.group(2) for run in method.compare for command in run.commands for word in command
          for m in _PLACEHOLDER.finditer(word) if m.group(1)}


def _parse_options(options: Sequence[str], runs_of: dict[str, methods.Method]
                   ) -> dict[str, dict[str, str]]:
  """["m.stage_steps=30", ...] → {"m": {"stage_steps": "30"}} for a method m; unknown ones: ValueError."""
  parsed: dict[str, dict[str, str]] = {}
  for option in options:
    key, has_value, value = option.partition("=")
    method, _, name = key.partition(".")
    if not has_value or not name:
      raise ValueError(f"--option={option}: expected METHOD.NAME=VALUE, e.g. <method>.stage_steps=30")
    if method not in runs_of:
      raise ValueError(f"--option={option}: no method {method!r} with comparison runs "
                       f"(methods: {', '.join(sorted(runs_of))})")
    known = _option_names(runs_of[method])
    if name not in known:
      raise ValueError(f"--option={option}: {method} has no option {name!r} "
                       f"(its options: {', '.join(sorted(known)) or 'none'})")
    parsed.setdefault(method, {})[name] = value
  return parsed


def plan(steps: int, root: str, options: Sequence[str] = ()) -> list[PlannedRun]:
  """Every method's comparison runs in their `order`, placeholders filled."""
  runs_of = {m.name: m for m in methods.all_methods() if m.compare}
  given = _parse_options(options, runs_of)
  runs = sorted(((run, name) for name, method in runs_of.items() for run in method.compare),
                key=lambda pair: pair[0].order)
  planned = []
  for run, name in runs:
    values = {"steps": str(steps), "root": root, "dir": f"{root}/{run.folder}"}
    commands = tuple(tuple(_fill(word, values, given.get(name, {})) for word in command)
                     for command in run.commands)
    planned.append(PlannedRun(run.title, values["dir"], commands))
  return planned


def run_all(planned: Sequence[PlannedRun], out_dir: str) -> str:
  """Runs every command of the plan in order, then compares the runs; the markdown."""
  for run in planned:
    for command in run.commands:
      argv = [sys.executable, "-m", *command]
      print(shlex.join(argv), flush=True)
      result = subprocess.run(argv, check=False)
      if result.returncode:
        raise RuntimeError(f"{run.title}: exit status {result.returncode} of {shlex.join(argv)}")
  return compare([r.workdir for r in planned], [r.title for r in planned], out_dir)


def main(argv, workdirs, names, out, run, steps, option, dry_run, baseline) -> None:
  """The command line (module docstring); errors in a plan are one line on stderr."""
  del argv
  if not run.value:
    if not workdirs.value:
      sys.exit("vlpre.compare: give --workdirs (runs to compare) or --run (every method's runs)")
    try:
      print(compare(workdirs.value, names.value or None, out.value or None,
                    baseline.value or None), end="")
    except ValueError as e:
      sys.exit(f"vlpre.compare: {e}")
    return
  root = out.value or "workdirs/compare"
  try:
    planned = plan(steps.value, root, option.value or ())
  except ValueError as e:
    sys.exit(f"vlpre.compare: {e}")
  if dry_run.value:
    for run_ in planned:
      for command in run_.commands:
        print(shlex.join([sys.executable, "-m", *command]))
    return
  try:
    print(run_all(planned, root), end="")
  except RuntimeError as e:
    sys.exit(f"vlpre.compare: {e}")


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define --out for their own main.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  _WORKDIRS = flags.DEFINE_list("workdirs", None, "runs to compare (plain or staged workdirs)")
  _NAMES = flags.DEFINE_list("names", [], "one name per run (default: each workdir's folder)")
  _OUT = flags.DEFINE_string("out", "", "where the table and PNGs go (default: the folder the "
                             "workdirs sit in; with --run: workdirs/compare, the runs' root)")
  _RUN = flags.DEFINE_bool("run", False, "run every method's comparison runs first "
                           "(vlpre.methods.Method.compare) and compare those")
  _STEPS = flags.DEFINE_integer("steps", 300, "with --run: each run's training steps ({steps})")
  _OPTION = flags.DEFINE_multi_string("option", [], "with --run: METHOD.NAME=VALUE for a "
                                      "method's {opt:NAME} / {arg:NAME}")
  _DRY_RUN = flags.DEFINE_bool("dry_run", False, "with --run: print the commands, run none")
  _BASELINE = flags.DEFINE_string("baseline", "", "the name (--names) the others are paired "
                                  "against, seed by seed (across_seeds)")
  app.run(lambda argv: main(argv, _WORKDIRS, _NAMES, _OUT, _RUN, _STEPS, _OPTION, _DRY_RUN,
                            _BASELINE))
