#!/usr/bin/env bash
# Single-node GPU run, one process driving all local GPUs (they form the mesh):
#   launch/gpu.sh configs/lift.py workdirs/lift_b16 [--config.x=y ...]
# Run it from the root of the checkout. The venv $VLPRE_VENV (default .venv) is made with a
# Python >= 3.11 and vlpre[cuda,gcs] installed into it (launch/setup_venv.sh; the system
# Python is left alone); then launch/worker.sh checks the config, builds the text store a
# cached LIFT run reads, and trains. Several nodes (or one process per GPU): launch/slurm.sh.
set -euo pipefail
if (( $# < 2 )); then
  echo "usage: $0 CONFIG WORKDIR [vlpre.main flags...]" >&2
  exit 2
fi
launch/setup_venv.sh cuda,gcs
# Let XLA use most of GPU memory up front; the step is compiled once.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec launch/worker.sh "$@"
