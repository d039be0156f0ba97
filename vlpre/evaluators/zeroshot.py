"""Zero-shot classification: class names through prompt templates, nearest class embedding."""
from __future__ import annotations

import numpy as np

from vlpre import data
from vlpre.evaluators import common

TEMPLATES = {
    "photo": ("a photo of a {}.",),
    # A short ensemble from the CLIP paper's ImageNet prompts.
    "clip7": ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}."),
}


class Evaluator:
  """cfg: data (glob), classnames (dataset folder holding classnames.json), templates,
  image_size, resize_size, batch_size, max_text_len, max_examples (0 = all)."""

  def __init__(self, name, cfg, predictor: common.Predictor):
    self.name, self.cfg, self.predictor = name, cfg, predictor
    self.classnames = data.load_classnames(cfg["classnames"], data_dir=cfg.get("data_dir"))
    templates = cfg.get("templates", "photo")
    self.templates = TEMPLATES[templates] if isinstance(templates, str) else tuple(templates)

  def class_embeddings(self, variables) -> np.ndarray:
    prompts = [t.format(c) for c in self.classnames for t in self.templates]
    z = common.normalize(self.predictor.text_embeddings(
        variables, prompts, self.cfg.get("max_text_len", 77)))
    z_CxTxE = z.reshape(len(self.classnames), len(self.templates), -1)
    return common.normalize(z_CxTxE.mean(axis=1))

  def run(self, variables) -> dict[str, float]:
    cfg = self.cfg
    batches = common.eval_batches(cfg, cfg["data"], max_examples=cfg.get("max_examples", 0),
                                  with_labels=True)
    images = self.predictor.image_embeddings(variables, batches)
    scores_NxC = common.normalize(images["zimg"]) @ self.class_embeddings(variables).T
    labels = images["label"]
    metrics = {f"{self.name}/top1": float(common.topk_hits(scores_NxC, labels, 1).mean())}
    if len(self.classnames) > 10:
      metrics[f"{self.name}/top5"] = float(common.topk_hits(scores_NxC, labels, 5).mean())
    return metrics
