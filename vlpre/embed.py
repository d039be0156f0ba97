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

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vlpre import config_lib
from vlpre import distributed
from vlpre import fatal
from vlpre import methods
from vlpre import metrics
from vlpre.text_encoders import store

_CONFIG = _WORKDIR = _DISTRIBUTED = _VERBOSE = None


def main(argv):
  del argv
  metrics.quiet_console(verbose=_VERBOSE.value)  # vlpre's progress lines, not the libraries'
  _DISTRIBUTED.initialize()  # before any other JAX call
  config = _CONFIG.value
  if _WORKDIR.value:
    config = config_lib.with_workdir(config, _WORKDIR.value)
  # A store begun with other settings, missing data, a full disk: one line and exit 1.
  with fatal.one_line_errors(verbose=_VERBOSE.value):
    if not methods.of(config).reads_embedding_store(config):  # e.g. configs/clip.py
      logging.info("this run reads no embedding store: nothing to precompute")
      return
    store.build_store(config)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A LIFT or GPT4Image config.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The workdir of the run the store feeds: "
                                 "the store goes under it unless config.text_cache is set.")
  _DISTRIBUTED = distributed.Flags()
  _VERBOSE = flags.DEFINE_bool("verbose_logs", False,
                               "Tracebacks and every library's INFO lines.")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=config_lib.parse_flags)
