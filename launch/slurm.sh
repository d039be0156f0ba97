#!/usr/bin/env bash
# Submits a vlpre run to GPU nodes under SLURM (launch/slurm.sbatch runs it).
#
#   launch/slurm.sh [--dry-run] [--per-gpu=G] [--sbatch-option=value ...] CONFIG WORKDIR [--config.x=y ...]
#
#   launch/slurm.sh --nodes=4 --partition=gpu configs/clip.py /shared/workdirs/clip_b16
#   launch/slurm.sh --nodes=2 --per-gpu=8 configs/lift.py /shared/workdirs/lift_b16
#
# Run it from the root of the checkout, on a filesystem the nodes share: the job runs
# there. Options before CONFIG go to sbatch (in --name=value form); --per-gpu=G starts
# one process per GPU (G per node) instead of one per node. First, the venv $VLPRE_VENV
# (default .venv) is made with a Python >= 3.11 and vlpre[cuda,gcs] and the offline model
# assets are installed into it (launch/setup_venv.sh; $VLPRE_PYTHON set: that interpreter
# is used as it is). Every task then checks the config, builds the text store a cached
# LIFT run reads and trains (launch/worker.sh). Arguments reach vlpre.main as typed:
# sbatch hands them to the script as an argument list, never through a shell.
# --dry-run prints the sbatch command, quoted, and does nothing else (no set-up):
# `bash -c "$(launch/slurm.sh --dry-run ...)"` submits exactly what a real launch would.
set -euo pipefail
DRY_RUN=0
SBATCH_OPTIONS=()
while (( $# )) && [[ $1 == -* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --per-gpu=*) SBATCH_OPTIONS+=("--ntasks-per-node=${1#--per-gpu=}" "--gpus-per-node=${1#--per-gpu=}") ;;
    --*=*) SBATCH_OPTIONS+=("$1") ;;
    *) echo "$0: sbatch options take the --name=value form, got $1" >&2; exit 2 ;;
  esac
  shift
done
if (( $# < 2 )); then
  echo "usage: $0 [--dry-run] [--per-gpu=G] [--sbatch-option=value ...] CONFIG WORKDIR [vlpre.main flags...]" >&2
  exit 2
fi
if [[ ! -f launch/slurm.sbatch ]]; then
  echo "$0: run it from the root of the vlpre checkout (the job runs there)" >&2
  exit 2
fi

COMMAND=(sbatch "${SBATCH_OPTIONS[@]}" launch/slurm.sbatch "$@")
if (( DRY_RUN )); then
  printf '%q ' "${COMMAND[@]}"
  echo
  exit 0
fi
if [[ -z ${VLPRE_PYTHON:-} ]]; then
  launch/setup_venv.sh cuda,gcs
fi
"${COMMAND[@]}"
