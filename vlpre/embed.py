"""Precomputes frozen text-encoder embeddings of a dataset's captions into a keyed store
(vlpre/text_encoders/store.py).

    python -m vlpre.embed --config=configs/lift.py:tiny

Resumable: a rerun continues at the first missing shard, and a complete store is a no-op.
What the store holds, which texts it embeds and how several hosts build it: the module
docstring of vlpre/text_encoders/store.py. Multi-host: one process per host with the same
arguments, as vlpre.main (vlpre/distributed.py).
"""
from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vlpre import distributed
from vlpre.text_encoders import store

_CONFIG = _DISTRIBUTED = None


def main(argv):
  del argv
  _DISTRIBUTED.initialize()  # before any other JAX call
  if not _CONFIG.value.get("text_encoder"):  # e.g. `make train CONFIG=configs/clip.py:tiny`
    logging.info("config has no text_encoder: no embeddings to precompute")
    return
  store.build_store(_CONFIG.value)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A LIFT or GPT4Image config.")
  _DISTRIBUTED = distributed.Flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
