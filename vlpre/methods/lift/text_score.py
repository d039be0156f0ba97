"""Scores a frozen text encoder alone, before any image training: caption↔caption retrieval.

    python -m vlpre.methods.lift.text_score --config=configs/lift.py:tiny
    python -m vlpre.methods.lift.text_score --config=configs/lift.py:tiny --config.text_encoder.name=minilm-l6

Every caption of Flickr8k val queries all the others; the captions of the same image are
its positives (4 per query). R@k is the share of queries with a positive among their k
nearest neighbours (cosine); a fixed text target that cannot tell one photo's captions
from another's cannot teach an image tower either (LIFT, METHODS.md). Chance R@1 is
4 / (N − 1).

`vlpre.methods.lift.text_recipes` runs this over templates × layers × pooling for the README table.
"""
from __future__ import annotations

from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from vlpre.data import sources
from vlpre.data import transforms
from vlpre.evaluators import common
from vlpre.text_encoders import store as store_lib


def split_captions(pattern: str | Sequence[str], data_dir: str | None = None,
                  max_images: int = 0, caption_field: str = "captions"):
  """(captions, owner image index per caption) of a captioned split, images not decoded."""
  source = sources.TarShardSource(pattern, data_dir)
  texts, owner = [], []
  count = len(source) if not max_images else min(max_images, len(source))
  for i in range(count):
    parsed = transforms.ParseCaption(field=caption_field, pick="all").map(dict(source[i]))
    if transforms.is_bad(parsed):
      continue
    for caption in parsed["captions"]:
      texts.append(caption)
      owner.append(i)
  return texts, np.asarray(owner)


def caption_retrieval(embeddings_NxE: np.ndarray, owner_N: np.ndarray, ks=(1, 5),
                      center: bool = False) -> dict[str, float]:
  """Caption→caption R@k: a query's own row excluded, same-owner rows are positives."""
  z = np.asarray(embeddings_NxE, np.float64)
  if center:
    z = z - z.mean(axis=0, keepdims=True)
  z = common.normalize(z.astype(np.float32)).astype(np.float64)
  scores_NxN = z @ z.T
  np.fill_diagonal(scores_NxN, -np.inf)
  k_max = max(ks)
  top_NxK = np.argpartition(-scores_NxN, k_max, axis=1)[:, :k_max]
  order = np.argsort(-np.take_along_axis(scores_NxN, top_NxK, axis=1), axis=1)
  top_NxK = np.take_along_axis(top_NxK, order, axis=1)
  hits_NxK = owner_N[top_NxK] == owner_N[:, None]
  return {f"R@{k}": float(hits_NxK[:, :k].any(axis=1).mean()) for k in ks}


def score(config, *, pattern: str = "flickr8k/val-*.tar", max_images: int = 0,
          batch_size: int = 128) -> dict[str, float]:
  """R@1/R@5 of `config.text_encoder` (as LIFT would use it), plus the mean-centred scores."""
  texts, owner = split_captions(pattern, config.input.get("data_dir"), max_images,
                               config.input.get("caption_field", "captions"))
  encoder = store_lib.text_encoder(config)
  embeddings = encoder.embed(texts, batch_size=batch_size)
  out = caption_retrieval(embeddings, owner)
  out.update({f"centred_{k}": v for k, v in caption_retrieval(embeddings, owner,
                                                               center=True).items()})
  out["num_captions"] = len(texts)
  out["chance_R@1"] = float(np.mean([(owner == o).sum() - 1 for o in owner]) / (len(owner) - 1))
  return out


_CONFIG = None


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  result = score(_CONFIG.value, max_images=_MAX_IMAGES.value)
  print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in result.items()))


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define flags of the same names.
  _MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "score the first N images' captions (0: all)")
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A LIFT config (its text_encoder).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
