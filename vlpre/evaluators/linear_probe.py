"""Linear probe on frozen image features: closed-form ridge regression onto one-hot labels.

The closed form (as in big_vision's few-shot evaluator) is deterministic and needs no
optimiser loop; the L2 strength is picked on a held-out fifth of the training split.
"""
from __future__ import annotations

import numpy as np

from vlpre.evaluators import common


def fit_ridge(x_NxD: np.ndarray, y_N: np.ndarray, num_classes: int, l2: float) -> np.ndarray:
  x = np.concatenate([x_NxD, np.ones((len(x_NxD), 1), x_NxD.dtype)], axis=1).astype(np.float64)
  targets_NxC = np.eye(num_classes)[y_N] * 2 - 1
  gram = x.T @ x + l2 * len(x) * np.eye(x.shape[1])
  return np.linalg.solve(gram, x.T @ targets_NxC)


def predict(w, x_NxD):
  x = np.concatenate([x_NxD, np.ones((len(x_NxD), 1), x_NxD.dtype)], axis=1)
  return np.argmax(x @ w, axis=1)


class Evaluator:
  """cfg: train_data, test_data (globs), num_classes, image_size, resize_size, batch_size,
  max_train_examples, max_examples, l2_grid, feature ("pre_logits" | "zimg").

  Metrics: top1, mean_per_class_recall (as clip_benchmark's linear probe reports), l2."""

  def __init__(self, name, cfg, predictor: common.Predictor):
    self.name, self.cfg, self.predictor = name, cfg, predictor

  def _features(self, variables, pattern, max_examples):
    cfg = self.cfg
    out = self.predictor.image_embeddings(
        variables, common.eval_batches(cfg, pattern, max_examples=max_examples, with_labels=True))
    return out[cfg.get("feature", "pre_logits")], out["label"]

  def run(self, variables) -> dict[str, float]:
    cfg = self.cfg
    x_train, y_train = self._features(variables, cfg["train_data"], cfg.get("max_train_examples", 0))
    x_test, y_test = self._features(variables, cfg["test_data"], cfg.get("max_examples", 0))
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    num_classes = cfg["num_classes"]
    order = np.random.default_rng(0).permutation(len(x_train))
    held, fit = order[: len(order) // 5], order[len(order) // 5:]
    best_l2 = max(cfg.get("l2_grid", (1e-4, 1e-3, 1e-2, 1e-1, 1.0)), key=lambda l2: np.mean(
        predict(fit_ridge(x_train[fit], y_train[fit], num_classes, l2), x_train[held]) == y_train[held]))
    w = fit_ridge(x_train, y_train, num_classes, best_l2)
    pred = predict(w, x_test)
    return {f"{self.name}/top1": float(np.mean(pred == y_test)),
            f"{self.name}/mean_per_class_recall": common.mean_per_class_recall(pred, y_test),
            f"{self.name}/l2": float(best_l2)}
