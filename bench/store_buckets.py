"""The embedding store's forward at several length-bucket sizes, side by side.

    XLA_FLAGS= python bench/store_buckets.py                  # 2,000 Flickr8k train captions
    XLA_FLAGS= python bench/store_buckets.py --captions=512 --multiples=16,4

The store (`vlpre.embed`, make train's first half) embeds captions sorted by token count,
each batch padded to a multiple of `text_batching.bucketed_batches`' `multiple` (16). Per
multiple this prints the shapes it compiles, the padded tokens against the real ones, the
first call of every shape (compile + run) and then the captions per second of a second
pass, and how far the embeddings move from those of the first multiple (padding is
masked, so only float rounding differs).
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from vlpre import config_lib  # noqa: E402
from vlpre.data import sources  # noqa: E402
from vlpre.data import text_batching  # noqa: E402
from vlpre.text_encoders import store as store_lib  # noqa: E402

_CONFIG = flags.DEFINE_string("config", os.path.join(ROOT, "configs", "lift.py") + ":tiny",
                              "the config whose text encoder embeds")
_CAPTIONS = flags.DEFINE_integer("captions", 2000, "Flickr8k train captions to embed")
_BATCH = flags.DEFINE_integer("batch_size", 64, "captions per batch")
_MULTIPLES = flags.DEFINE_list("multiples", ["16", "8", "4"], "bucket multiples to compare")


def main(argv):
  del argv
  encoder = store_lib.text_encoder(config_lib.load(_CONFIG.value))
  source = sources.TarShardSource("flickr8k/train-*.tar")
  captions: list[str] = []
  for i in range(len(source)):
    captions += json.loads(source[i]["json"])["captions"]
    if len(captions) >= _CAPTIONS.value:
      break
  captions = captions[:_CAPTIONS.value]
  ids_NxL, mask_NxL = encoder.tokenizer.encode_batch(captions, encoder.max_len)
  real = int(mask_NxL.sum())
  print(f"{len(captions)} captions, {real / len(captions):.1f} tokens each on average "
        f"({mask_NxL.sum(1).min()}–{mask_NxL.sum(1).max()}), batch {_BATCH.value}\n")
  print("| multiple | shapes compiled | padded ÷ real tokens | first call per shape, s | captions/s | max abs diff |")
  print("|---|---|---|---|---|---|")
  apply = jax.jit(encoder.module.apply)
  variables = jax.device_put({"params": encoder.params})
  first = None
  for multiple in map(int, _MULTIPLES.value):
    batches = list(text_batching.bucketed_batches(ids_NxL, mask_NxL, _BATCH.value, multiple))
    shapes = sorted({ids.shape[1] for _, ids, _ in batches})
    start = time.perf_counter()
    for length in shapes:
      _, ids, mask = next(b for b in batches if b[1].shape[1] == length)
      np.asarray(apply(variables, ids, mask))
    compile_s = time.perf_counter() - start
    out_NxD = np.zeros((len(captions), encoder.dim), np.float32)
    start = time.perf_counter()
    for rows, ids, mask in batches:
      out_NxD[rows] = np.asarray(apply(variables, ids, mask))[:len(rows)]
    rate = len(captions) / (time.perf_counter() - start)
    first = out_NxD if first is None else first
    padded = sum(ids.shape[1] * len(rows) for rows, ids, _ in batches)
    print(f"| {multiple} | {shapes} | {padded / real:.2f} | {compile_s:.1f} | {rate:.1f} | "
          f"{np.abs(out_NxD - first).max():.1e} |")


if __name__ == "__main__":
  app.run(main)
