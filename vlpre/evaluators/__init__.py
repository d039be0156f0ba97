"""Evaluators: a file each, named by `kind` in the config's `evals` dict.

    config.evals.<name> = dict(kind="zeroshot" | "retrieval" | "sugarcrepe" | "linear_probe"
                                    | "classification" | ...,
                               every_steps=..., at_start=False, at_end=True,
                               **kind-specific fields)

`every_steps` (0: never on a schedule), `at_end` (the last step) and `at_start` (on the
initial parameters, before step 1 of a fresh run: "before training" numbers, e.g. a
probe of pretrained or transferred weights) say when an evaluator runs.

Each kind's file defines `Evaluator(name, cfg, predictor, tokenizer)` with
`run(variables) -> {"<name>/<metric>": float}`. They run during training and from
`python -m vlpre.evaluate`.
"""
from __future__ import annotations

import importlib
from typing import Any

from vlpre.evaluators.common import Predictor


class Scheduled:
  """Wraps an evaluator with its schedule: every `every_steps`, at the last step, at start."""

  def __init__(self, name: str, cfg: Any, evaluator: Any):
    self.name, self.every_steps, self.evaluator = name, cfg.get("every_steps", 0), evaluator
    self.at_start, self.at_end = bool(cfg.get("at_start", False)), bool(cfg.get("at_end", True))

  def due(self, step: int, total_steps: int | None) -> bool:
    if step == 0:
      return self.at_start
    if self.every_steps and step % self.every_steps == 0:
      return True
    return self.at_end and total_steps is not None and step == total_steps

  def run(self, variables) -> dict[str, float]:
    return self.evaluator.run(variables)


def build_evaluators(evals_cfg: Any, setup: Any, *, tokenizer: Any) -> list[Scheduled]:
  predictor = Predictor(setup, tokenizer)
  result = []
  for name, cfg in dict(evals_cfg).items():
    kind = cfg["kind"]
    try:
      module = importlib.import_module(f"vlpre.evaluators.{kind}")
    except ModuleNotFoundError as e:
      raise ValueError(f"evals.{name}: no evaluator kind '{kind}' (vlpre/evaluators/{kind}.py)") from e
    result.append(Scheduled(name, cfg, module.Evaluator(name, cfg, predictor)))
  return result
