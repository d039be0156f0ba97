"""Entry point: `python -m vlpre.main --config=configs/X.py[:arg] --workdir=DIR [--config.a=b]`."""
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vlpre import stages
from vlpre import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (see configs/).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  if os.environ.get("VLPRE_MULTIHOST"):  # TPU pods / multi-node GPU: one process per host
    jax.distributed.initialize()
  if _CONFIG.value.get("stages"):  # staged training (vlpre/stages.py)
    stages.run(_CONFIG.value, _WORKDIR.value)
  else:
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
