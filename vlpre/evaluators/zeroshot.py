"""Zero-shot classification: class names through prompt templates, nearest class embedding."""
from __future__ import annotations

import numpy as np

from vlpre import data
from vlpre.evaluators import common

# The 80 ImageNet prompts of OpenAI's CLIP (its "Prompt Engineering for ImageNet"
# notebook), in their order: the ensemble CLIP's and open_clip's ImageNet numbers use.
_OPENAI_IMAGENET = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)

# Template sets by name (the `templates` field of a zero-shot eval).
TEMPLATES = {
    "photo": ("a photo of a {}.",),
    # A short ensemble from the CLIP paper's ImageNet prompts.
    "clip7": ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}."),
    "openai_imagenet": _OPENAI_IMAGENET,  # all 80
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

  Metrics: top1 (and top5 past 10 classes), and mean_per_class_recall (the recall of each
  class present, averaged: clip_benchmark's metric of the same name, sklearn's balanced
  accuracy), which weighs a rare class like a common one.
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
    if isinstance(templates, str) and templates not in TEMPLATES:
      raise ValueError(f"evals.{name}.templates: no template set {templates!r}; sets: "
                       f"{', '.join(TEMPLATES)} (or a list of templates)")
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
                                  with_labels=True, num_classes=len(self.classnames))
    images = self.predictor.image_embeddings(variables, batches)
    scores_NxC = common.normalize(images["zimg"]) @ self.class_embeddings(variables).T
    labels = images["label"]
    metrics = {f"{self.name}/top1": float(common.topk_hits(scores_NxC, labels, 1).mean())}
    if len(self.classnames) > 10:
      metrics[f"{self.name}/top5"] = float(common.topk_hits(scores_NxC, labels, 5).mean())
    metrics[f"{self.name}/mean_per_class_recall"] = common.mean_per_class_recall(
        scores_NxC.argmax(axis=1), labels)
    return metrics
