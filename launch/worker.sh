#!/usr/bin/env bash
# What every worker (TPU VM host, GPU node or SLURM task) runs, in the vlpre checkout:
#
#   launch/worker.sh CONFIG WORKDIR [vlpre.main flags...]
#
#   1. `vlpre.main --check`: the config, its data and its mesh are checked on this
#      worker (one line per problem, exit 1) before anything is built or trained;
#   2. `vlpre.embed`: the frozen-text store a cached LIFT (or GPT4Image) run reads is
#      built under WORKDIR (resumable; a no-op once complete or for a run that reads no
#      store), on every worker together, as vlpre.main runs;
#   3. `vlpre.main`, exec'ed: its exit status is the worker's (143: stopped by SIGTERM with
#      the last step saved; rerun to resume).
# The interpreter is $VLPRE_PYTHON, default $VLPRE_VENV/bin/python (.venv: made by
# launch/setup_venv.sh). vlpre.embed takes the config overrides (--config.x=y) of the
# flags; vlpre.main and its check take them all, exactly as typed.
set -euo pipefail
if (( $# < 2 )); then
  echo "usage: $0 CONFIG WORKDIR [vlpre.main flags...]" >&2
  exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
PYTHON=${VLPRE_PYTHON:-${VLPRE_VENV:-.venv}/bin/python}
OVERRIDES=()
for arg in "$@"; do
  if [[ $arg == --config.* ]]; then OVERRIDES+=("$arg"); fi
done
"$PYTHON" -m vlpre.main --check "--config=$CONFIG" "--workdir=$WORKDIR" "$@"
"$PYTHON" -m vlpre.embed "--config=$CONFIG" "--workdir=$WORKDIR" "${OVERRIDES[@]}"
exec "$PYTHON" -m vlpre.main "--config=$CONFIG" "--workdir=$WORKDIR" "$@"
