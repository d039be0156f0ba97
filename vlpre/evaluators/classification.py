"""Top-1 (and top-5) accuracy of the model's own classifier head on a labelled split.

For supervised models (vlpre/methods/gpt4image/model.py): the model's `classify(image)` gives
the logits, on the evaluation path (BatchNorm on running statistics, no mixing).
"""
from __future__ import annotations

import numpy as np

from vlpre.evaluators import common


class Evaluator:
  """cfg: data (glob), image_size, resize_size, batch_size, max_examples (0 = all),
  method (the model's logits method, default "classify")."""

  def __init__(self, name, cfg, predictor: common.Predictor):
    self.name, self.cfg, self.predictor = name, cfg, predictor

  def run(self, variables) -> dict[str, float]:
    cfg = self.cfg
    method = cfg.get("method", "classify")
    batches = common.eval_batches(cfg, cfg["data"], max_examples=cfg.get("max_examples", 0),
                                  with_labels=True)
    out = self.predictor.image_outputs(variables, batches, method)
    logits_NxC, labels_N = out[method], out["label"]
    metrics = {f"{self.name}/top1": float(common.topk_hits(logits_NxC, labels_N, 1).mean()),
               f"{self.name}/num_examples": float(len(labels_N))}
    if logits_NxC.shape[1] > 10:
      metrics[f"{self.name}/top5"] = float(common.topk_hits(logits_NxC, labels_N, 5).mean())
    return metrics
