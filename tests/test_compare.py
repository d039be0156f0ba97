"""vlpre.compare on synthetic metrics.jsonl files: a plain run, a staged run, a run missing
a metric. Lines are written the way train.run writes them: training lines carry "loss",
each evaluator's results come in a line of their own (at step 0 when `at_start`). Then
`--run`'s plan (make compare): every method's CompareRuns, placeholders and options filled."""
import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

from vlpre import compare
from vlpre import config_lib
from vlpre import methods
from vlpre import run_record

from tests.test_storage import fake_gcs  # pylint: disable=unused-import  (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
R1, ZS = "retrieval_flickr8k/i2t_R@1", "zeroshot_cifar10/top1"


def _write(directory, lines, name="metrics.jsonl"):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)


def _train(step, loss, seconds_per_step=0.5):
  """A training line, with the per-step training metrics that must not become columns."""
  return {"step": step, "loss": loss, "clip/i2t_accuracy": 0.1, "lm/loss": loss,
          "perf/seconds_per_step": seconds_per_step, "input/bad_fraction": 0.0}


@pytest.fixture
def runs(tmp_path):
  # Plain run: R@1 evaluated at 10 and 20 (a curve), zero-shot at the end only.
  plain = tmp_path / "runs" / "clip"
  _write(plain, [_train(1, 8.0), _train(10, 4.0), {"step": 10, R1: 0.01},
                 _train(20, 2.0), {"step": 20, R1: 0.03, ZS: 0.2}])
  # Staged run (stages.py layout, folders out of lexical order): probe before and after.
  staged = tmp_path / "runs" / "hive"
  _write(staged / "0_projectors", [{"step": 0, "linear_probe/top1": 0.3},
                                   _train(1, 9.0, 1.0), _train(10, 6.0, 1.0)])
  _write(staged / "1_llm", [_train(1, 5.0, 2.0), _train(5, 4.5, 2.0)])
  _write(staged / "10_all", [_train(1, 4.0, 3.0), _train(10, 3.0, 3.0),
                             {"step": 10, "linear_probe/top1": 0.4, ZS: 0.25}])
  # Missing R@1; resumed at step 10: the later line of a step wins (read_metrics).
  missing = tmp_path / "runs" / "lift"
  _write(missing, [_train(1, 7.0), _train(10, 6.9), _train(20, 6.0), _train(10, 5.0),
                   _train(20, 1.0), {"step": 20, ZS: 0.15}])
  return [str(plain), str(staged), str(missing)]


def test_vlpre_evaluates_rows_count_and_a_cut_line_is_skipped(tmp_path):
  """vlpre.evaluate's rows (metrics_eval.jsonl) join the trainer's; a line cut off by a
  kill in either file is skipped."""
  run = tmp_path / "clip"
  _write(run, [_train(1, 8.0), _train(10, 4.0)])
  with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 11, "lo')
  _write(run, [{"step": 10, R1: 0.02}], name="metrics_eval.jsonl")
  got = compare.read_run(str(run))
  assert got.eval_keys == [R1] and got.series(R1) == [(10, 0.02)]
  assert [r["step"] for r in got.training_rows()] == [1, 10]


def test_staged_run_is_one_curve_with_offsets(runs):
  run = compare.read_run(runs[1])
  assert run.name == "hive"
  assert [r["step"] for r in run.training_rows()] == [1, 10, 11, 15, 16, 25]
  assert [r["loss"] for r in run.training_rows()] == [9.0, 6.0, 5.0, 4.5, 4.0, 3.0]
  assert run.series("linear_probe/top1") == [(0, 0.3), (25, 0.4)]  # before, after
  assert run.stage_starts == [10, 15]
  assert run.eval_keys == ["linear_probe/top1", ZS]


def test_table_values_blanks_and_eval_key_rule(runs, tmp_path):
  out = tmp_path / "out"
  text = compare.compare(runs, ["CLIP", "HIVE", "LIFT"], str(out))
  header, *body = list(csv.reader(open(out / "compare.csv", encoding="utf-8")))
  # Training metrics with a "/" (clip/, lm/, perf/, input/) are not eval columns.
  assert header == ["run", "steps", "loss", "train_time_s", R1, ZS, "linear_probe/top1"]
  rows = {row[0]: dict(zip(header, row)) for row in body}
  assert rows["CLIP"] == {"run": "CLIP", "steps": "20", "loss": "2.0", "train_time_s": "10.0",
                          R1: "0.03", ZS: "0.2", "linear_probe/top1": ""}
  # 10 steps × 1 s + 5 × 2 s + 10 × 3 s.
  assert rows["HIVE"] == {"run": "HIVE", "steps": "25", "loss": "3.0", "train_time_s": "50.0",
                          R1: "", ZS: "0.25", "linear_probe/top1": "0.4"}
  assert rows["LIFT"][R1] == "" and rows["LIFT"]["loss"] == "1.0"
  assert rows["LIFT"]["train_time_s"] == "10.0"  # a resumed step counted once
  # The markdown: the same table, rounded, blanks empty; it is what was printed.
  assert (out / "compare.md").read_text(encoding="utf-8") == text
  lines = text.splitlines()
  assert lines[2] == "| " + " | ".join(header) + " |"
  assert "| HIVE | 25 | 3 | 50 |  | 0.25 | 0.4 |" in lines


def test_plots_are_png_files(runs, tmp_path):
  compare.compare(runs, None, str(tmp_path / "out"))
  pngs = sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".png"))
  # R@1 and the probe have ≥2 points in some run; zero-shot only ever one: no plot.
  assert pngs == ["eval_linear_probe_top1.png", "eval_retrieval_flickr8k_i2t_R_1.png",
                  "loss.png"]
  for name in pngs:
    with open(tmp_path / "out" / name, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE


def test_errors(runs, tmp_path):
  with pytest.raises(ValueError, match="2 names for 3 workdirs"):
    compare.compare(runs, ["a", "b"], str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    compare.read_run(str(tmp_path / "nowhere"))


def test_a_cut_off_last_line_is_skipped(runs):
  """kill -9 mid-write leaves a last line without its end: the run reads as before it."""
  path = os.path.join(runs[0], "metrics.jsonl")
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"step": 30, "loss": 1.5, "perf/seconds_')
  run = compare.read_run(runs[0])
  assert [r["step"] for r in run.training_rows()] == [1, 10, 20]
  assert compare.table([run])[1][0][:3] == ["clip", 20, 2.0]


def _recorded(directory, lr):
  config = config_lib.base("tiny")
  config.optim.lr, config.log_every = lr, int(lr * 1e4)  # log_every never counts as a change
  run_record.write(config, str(directory), None, None, {})


def test_runs_in_a_bucket_with_their_config_differences(tmp_path, fake_gcs, monkeypatch):
  """gs:// runs (a fake bucket over tmp_path) are read and the outputs written through
  epath; the fields their recorded configs differ in end compare.md."""
  monkeypatch.chdir(tmp_path)  # where os.path would put ./gs:/...
  _write(fake_gcs / "b" / "sweep" / "lr_a", [_train(1, 8.0), _train(10, 4.0),
                                             {"step": 10, R1: 0.01}])
  _write(fake_gcs / "b" / "sweep" / "lr_b", [_train(1, 8.0), _train(10, 3.0)])
  with open(fake_gcs / "b" / "sweep" / "lr_b" / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 20, "lo')  # cut off by a kill
  runs = ["gs://b/sweep/lr_a", "gs://b/sweep/lr_b"]
  for run, lr in zip(runs, (1e-3, 2e-3)):
    _recorded(run, lr)
  text = compare.compare(runs)  # --out defaults to the runs' folder, in the bucket
  out = fake_gcs / "b" / "sweep"
  assert (out / "compare.md").read_text(encoding="utf-8") == text
  assert "| lr_a | 10 | 4 |" in text and "| lr_b | 10 | 3 |" in text
  assert text.endswith("| field | lr_a | lr_b |\n|---|---|---|\n| optim.lr | 0.001 | 0.002 |\n")
  assert list(csv.reader(open(out / "compare_config.csv", encoding="utf-8"))) == [
      ["field", "lr_a", "lr_b"], ["optim.lr", "0.001", "0.002"]]
  with open(out / "loss.png", "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  assert not (tmp_path / "gs:").exists() and not (tmp_path / "b").exists()


def test_seeds_mean_std_and_paired_differences(tmp_path):
  """Runs sharing a name are seeds of one setting: mean ± sample std per name, and with a
  baseline the differences paired by config.seed (a seed the baseline lacks is left out)."""
  r1 = {("a", 0): 0.10, ("a", 1): 0.14, ("b", 0): 0.20, ("b", 1): 0.30, ("b", 2): 0.9}
  workdirs, names = [], []
  for (name, seed), value in r1.items():
    directory = tmp_path / f"{name}_s{seed}"
    _write(directory, [_train(10, 1.0 + seed), {"step": 10, R1: value}])
    config = config_lib.base("tiny")
    config.seed = seed
    run_record.write(config, str(directory), None, None, {})
    workdirs.append(str(directory))
    names.append(name)
  runs = [compare.read_run(w, n) for w, n in zip(workdirs, names)]
  header, body = compare.across_seeds(runs, baseline="a")
  column = header.index(R1)
  assert [row[:2] for row in body] == [["a", 2], ["b", 3], ["b − a", 2]]
  assert body[0][column] == "0.12 ± 0.028"  # std of 0.10, 0.14 (n - 1)
  assert body[1][header.index("loss")] == "2 ± 1"
  assert body[2][column] == "0.13 ± 0.042"  # 0.10 and 0.16: seed 2 has no pair
  text = compare.compare(workdirs, names, str(tmp_path / "out"), baseline="a")
  assert "Across seeds" in text and "| b − a | 2 |" in text
  assert (tmp_path / "out" / "compare_seeds.csv").exists()
  assert "| seed | 0 | 1 | 0 | 1 | 2 |" in text  # config differences keep same-named runs apart
  with pytest.raises(ValueError, match="--baseline 'c' is none of the runs' names"):
    compare.across_seeds(runs, baseline="c")


@pytest.mark.integration
def test_command_line_defaults_to_the_runs_folder(runs):
  result = subprocess.run([sys.executable, "-m", "vlpre.compare", "--workdirs=" + ",".join(runs)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
  out = os.path.dirname(runs[0])
  assert "| clip | 20 |" in result.stdout
  assert os.path.isfile(os.path.join(out, "compare.csv"))
  assert os.path.isfile(os.path.join(out, "loss.png"))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "vlpre.compare", *args], capture_output=True,
                        text=True, check=False, cwd=ROOT)


def test_run_plan_has_every_method_in_order_with_placeholders_filled(tmp_path):
  root = str(tmp_path / "cmp")
  expected = sorted(((run, m.name) for m in methods.all_methods() for run in m.compare),
                    key=lambda pair: pair[0].order)
  assert len({name for _, name in expected}) >= 2, "discovery found (almost) no method's runs"
  result = _cli("--run", "--dry_run", "--steps=7", f"--out={root}")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines == [shlex.join([sys.executable, "-m", *command])
                   for run in compare.plan(7, root) for command in run.commands]
  planned = compare.plan(7, root)
  assert [(r.title, r.workdir) for r in planned] == [(run.title, f"{root}/{run.folder}")
                                                     for run, _ in expected]
  assert [len(r.commands) for r in planned] == [len(run.commands) for run, _ in expected]
  words = [w for r in planned for c in r.commands for w in c]
  assert not [w for w in words if "{" in w], "placeholders left unfilled"
  assert f"--workdir={root}/clip" in words and "--config.total_steps=7" in words
  hive = next(r for r in planned if r.workdir == f"{root}/hive")
  # Without options: the :tiny stages, the ViT from this comparison's LIFT run.
  assert hive.commands == (("vlpre.main", "--config=configs/hive.py:tiny",
                            f"--config.init_from.workdir={root}/lift", f"--workdir={root}/hive"),)


def test_run_options_reach_their_method(tmp_path):
  root = str(tmp_path)
  planned = compare.plan(7, root, ["hive.stage_steps=30", "hive.init="])
  hive = next(r for r in planned if r.workdir == f"{root}/hive")
  assert hive.commands == (("vlpre.main", "--config=configs/hive.py:tiny,stage_steps=30",
                            "--config.init_from.workdir=", f"--workdir={root}/hive"),)
  others = [r for r in compare.plan(7, root) if r.workdir != f"{root}/hive"]
  assert others == [r for r in planned if r.workdir != f"{root}/hive"]


def test_run_option_errors_are_one_line():
  with pytest.raises(ValueError, match="no method 'nosuch'"):
    compare.plan(7, "x", ["nosuch.stage_steps=30"])
  with pytest.raises(ValueError, match=r"hive has no option 'steps' \(its options: init, stage_"):
    compare.plan(7, "x", ["hive.steps=30"])
  with pytest.raises(ValueError, match="expected METHOD.NAME=VALUE"):
    compare.plan(7, "x", ["stage_steps=30"])
  result = _cli("--run", "--dry_run", "--option=nosuch.stage_steps=30")
  assert result.returncode != 0 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      "vlpre.compare: --option=nosuch.stage_steps=30: no method 'nosuch' with comparison runs "
      f"(methods: {', '.join(sorted(m.name for m in methods.all_methods() if m.compare))})"]


def test_placeholders():
  values = {"steps": "7", "root": "r", "dir": "r/x"}
  fill = compare._fill  # pylint: disable=protected-access
  assert fill("a{steps}{dir}{opt:v}{opt:w={root}/y}{arg:s}", values, {}) == "a7r/xr/y"
  given = {"v": "1", "w": "", "s": "3"}
  assert fill("{opt:v}{opt:w={root}/y}c:t{arg:s}", values, given) == "1c:t,s=3"
  for bad in ("{nope}", "{arg:s=1}", "{steps=1}"):
    with pytest.raises(ValueError, match="unknown placeholder"):
      fill(bad, values, {})
