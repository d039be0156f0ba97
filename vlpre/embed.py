"""Precomputes frozen text-encoder embeddings of a dataset's captions into a keyed store
(vlpre/text_encoders/store.py).

    python -m vlpre.embed --config=configs/lift.py:tiny

With `config.text_mode = "cached"` the input pipeline then joins each sample to its
embedding by key, and the train step never runs the LLM (LIFT's O(1) text cost).

The texts are the split's captions, or, for a config with a `describe` section
(GPT4Image), the descriptions that `python -m vlpre.methods.gpt4image.describe` wrote for each image.

Store layout (`config.text_cache`): `meta.json` (the encoder settings it was built
with), and per shard of samples `emb-NNNNN.npy` (float32 [captions, E], memory-mapped)
with `index-NNNNN.json` ({key: [first row, number of captions]}). Shards are written
to a temporary name and renamed when complete, so an interrupted run resumes at the
first missing shard. Multi-host: one process per host with the same arguments, as
vlpre.main (vlpre/distributed.py); the encoder is sharded over every host's devices and
process 0 writes the store, which must be a place all hosts see (gs://, a shared disk).
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
