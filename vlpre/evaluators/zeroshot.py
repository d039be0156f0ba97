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


def fill(template: str, classname: str) -> str:
  """The prompt of `template` ("a photo of a {}." or clip_benchmark's "a photo of a {c}.")."""
  return template.replace("{c}", classname).replace("{}", classname)


class Evaluator:
  """cfg: data, format ("vlpre" | "clip_benchmark" | "tfds", see `data.open_eval_split`),
  split, classnames, templates, image_size, resize_size, batch_size, max_text_len,
  max_examples (0 = all).

  Class names: `classnames` (a dataset folder holding classnames.json) if set, else the
  split's own (clip_benchmark's classnames.txt, a TFDS label feature). Templates: the
  `templates` field if set (a name in TEMPLATES or a list, "{}" or "{c}" where the class
  name goes), else clip_benchmark's zeroshot_classification_templates.txt, else "photo".
  """

  def __init__(self, name, cfg, predictor: common.Predictor):
    self.name, self.cfg, self.predictor = name, cfg, predictor
    self.split = data.open_eval_split(cfg, labels=True)
    if cfg.get("classnames"):
      self.classnames = data.load_classnames(cfg["classnames"], data_dir=cfg.get("data_dir"))
    elif self.split.classnames:
      self.classnames = list(self.split.classnames)
    else:
      raise ValueError(f"evals.{name}: no class names: set `classnames` (a folder holding "
                       f"classnames.json); {self.split.source!r} carries none")
    templates = cfg.get("templates") or self.split.templates or "photo"
    self.templates = TEMPLATES[templates] if isinstance(templates, str) else tuple(templates)

  def class_embeddings(self, variables) -> np.ndarray:
    prompts = [fill(t, c) for c in self.classnames for t in self.templates]
    z = common.normalize(self.predictor.text_embeddings(
        variables, prompts, self.cfg.get("max_text_len", 77)))
    z_CxTxE = z.reshape(len(self.classnames), len(self.templates), -1)
    return common.normalize(z_CxTxE.mean(axis=1))

  def run(self, variables) -> dict[str, float]:
    cfg = self.cfg
    batches = common.eval_batches(cfg, self.split.source, max_examples=cfg.get("max_examples", 0),
                                  with_labels=True)
    images = self.predictor.image_embeddings(variables, batches)
    scores_NxC = common.normalize(images["zimg"]) @ self.class_embeddings(variables).T
    labels = images["label"]
    metrics = {f"{self.name}/top1": float(common.topk_hits(scores_NxC, labels, 1).mean())}
    if len(self.classnames) > 10:
      metrics[f"{self.name}/top5"] = float(common.topk_hits(scores_NxC, labels, 5).mean())
    return metrics
