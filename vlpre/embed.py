"""Precomputes frozen text-encoder embeddings of a dataset's captions into a keyed store
(vlpre/text_encoders/store.py).

    python -m vlpre.embed --config=configs/lift.py:tiny --workdir=workdirs/lift

`--workdir` is the run's that the store feeds: by default the store goes under it
(`store.cache_dir`), where vlpre.main then finds it, and every host sees it on gs://.
Resumable: a rerun continues at the first missing shard, and a complete store is a no-op,
as is a config whose run reads no store (`Method.reads_embedding_store`: no text
encoder, LIFT online without centring), so a launcher can run this before every run.
What the store holds, which texts it embeds and how several hosts build it: the module
docstring of vlpre/text_encoders/store.py. Multi-host: one process per host with the same
arguments, as vlpre.main (vlpre/distributed.py).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vlpre import config_lib
from vlpre import distributed
from vlpre import methods
from vlpre.text_encoders import store

_CONFIG = _WORKDIR = _DISTRIBUTED = None


def main(argv):
  del argv
  _DISTRIBUTED.initialize()  # before any other JAX call
  config = _CONFIG.value
  if _WORKDIR.value:
    config = config_lib.with_workdir(config, _WORKDIR.value)
  try:
    if not methods.of(config).reads_embedding_store(config):  # e.g. configs/clip.py
      logging.info("this run reads no embedding store: nothing to precompute")
      return
    store.build_store(config)
  except (ValueError, FileNotFoundError) as e:  # a store begun with other settings, missing data
    print(f"vlpre.embed: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A LIFT or GPT4Image config.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The workdir of the run the store feeds: "
                                 "the store goes under it unless config.text_cache is set.")
  _DISTRIBUTED = distributed.Flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
