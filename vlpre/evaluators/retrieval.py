"""Image↔text retrieval Recall@K on a captioned split (every image has several captions)."""
from __future__ import annotations

import numpy as np

from vlpre import data
from vlpre.evaluators import common


def recall_at_k(zimg_NxE: np.ndarray, ztxt_MxE: np.ndarray, caption_image_M: np.ndarray,
                ks=(1, 5, 10)) -> dict[str, float]:
  """i2t: any of the image's captions in the top k; t2i: the caption's image in the top k."""
  scores_NxM = common.normalize(zimg_NxE) @ common.normalize(ztxt_MxE).T
  captions_of = [set(np.flatnonzero(caption_image_M == i).tolist()) for i in range(len(zimg_NxE))]
  out = {}
  for k in ks:
    out[f"i2t_R@{k}"] = float(common.topk_hits(scores_NxM, captions_of, k).mean())
    out[f"t2i_R@{k}"] = float(common.topk_hits(scores_NxM.T, caption_image_M, k).mean())
  return out


class Evaluator:
  """cfg: data, format ("vlpre" | "clip_benchmark" | "tfds", see `data.open_eval_split`),
  split, image_size, resize_size, batch_size, max_text_len, max_examples.

  Captions: vlpre's `.json` "captions"; clip_benchmark's `.txt`, one caption a line; a
  TFDS text feature (`tfds_text_key`, default "captions").
  """

  def __init__(self, name, cfg, predictor: common.Predictor):
    self.name, self.cfg, self.predictor = name, cfg, predictor
    self.split = data.open_eval_split(cfg, captions=True)

  def run(self, variables) -> dict[str, float]:
    cfg = self.cfg
    captions: list[list[str]] = []

    def batches():
      for batch in common.eval_batches(cfg, self.split.source, max_examples=cfg.get("max_examples", 0),
                                       with_captions=True):
        captions.extend(batch["captions"])
        yield batch

    zimg = self.predictor.image_embeddings(variables, batches())["zimg"]
    texts = [c for caps in captions for c in caps]
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps])
    ztxt = self.predictor.text_embeddings(variables, texts, cfg.get("max_text_len", 77))
    return {f"{self.name}/{k}": v for k, v in recall_at_k(zimg, ztxt, owner).items()}
