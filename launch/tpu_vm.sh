#!/usr/bin/env bash
# Runs a vlpre config on every worker of a TPU VM slice or pod: one process per worker,
# jax.distributed initialised from the TPU metadata (VLPRE_MULTIHOST=1, vlpre/distributed.py),
# each process reading its share of every global batch.
#
#   launch/tpu_vm.sh [--dry-run] TPU_NAME ZONE configs/lift.py gs://BUCKET/workdir [--config.x=y ...]
#
# Each worker is set up first, so a fresh VM works (a rerun only checks): the repository
# ($VLPRE_REPO, default this checkout's `origin`) is cloned into ~/vlpre at this
# checkout's commit ($VLPRE_REF; push it first), a venv is made in ~/vlpre/.venv with a
# Python >= 3.11 (stock TPU VM images have 3.10: install python3.11 there first, or the
# launch stops with one line saying so), and vlpre[tpu,gcs] and the offline model assets
# are installed into it (launch/setup_venv.sh). Then every worker checks the config
# (`vlpre.main --check`), builds the text store a cached LIFT run reads (`vlpre.embed`,
# under the workdir) and trains (launch/worker.sh). $VLPRE_DATA_DIR, if set, is passed on.
# The workdir must be one every worker sees (a gs:// bucket); so may the data be
# (`--config.input.data_dir=gs://...`: shards are read from the bucket).
#
# Quoting: every argument reaches the workers' shell (bash, the TPU VM default) quoted
# with printf %q, so values with spaces, quotes or $ arrive as typed. --dry-run prints
# the gcloud command, itself quoted, instead of running it: `bash -c "$(launch/tpu_vm.sh
# --dry-run ...)"` runs exactly what a real launch would.
#
# Exit status: vlpre.main's. 143 means a SIGTERM (preemption) stopped the run with its
# last finished step saved: run the same command again to resume.
set -euo pipefail
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
if (( $# < 4 )); then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [vlpre.main flags...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=${VLPRE_REPO:-$(git remote get-url origin)}
REF=${VLPRE_REF:-$(git rev-parse HEAD)}

quoted() { printf '%q ' "$@"; }  # words for the remote shell, each quoted

DATA_DIR_EXPORT=""
if [[ -n ${VLPRE_DATA_DIR:-} ]]; then DATA_DIR_EXPORT="VLPRE_DATA_DIR=$(quoted "$VLPRE_DATA_DIR")"; fi

REMOTE="set -euo pipefail
[ -d ~/vlpre/.git ] || git clone -q $(quoted "$REPO") ~/vlpre
cd ~/vlpre
git fetch -q origin && git checkout -q $(quoted "$REF")
launch/setup_venv.sh tpu,gcs
export VLPRE_MULTIHOST=1 $DATA_DIR_EXPORT
exec launch/worker.sh $(quoted "$CONFIG" "$WORKDIR" "$@")"

COMMAND=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE")
if (( DRY_RUN )); then
  quoted "${COMMAND[@]}"
  echo
else
  "${COMMAND[@]}"
fi
