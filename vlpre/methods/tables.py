"""What the methods' results-table scripts share (`python -m vlpre.methods.<name>.table`).

Each script trains a few real runs on one CPU device, keeps each finished run's numbers in
`<root>/results.json` (a rerun skips them) and writes a markdown table from them.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Callable

from absl import logging
import jax

from vlpre import metrics

# The checkout the scripts run from: configs/ sits beside the vlpre package.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def use_one_device() -> None:
  """One JAX CPU device: small runs gain nothing from 8 fake devices on 2 cores.

  XLA reads XLA_FLAGS when the first device is used, not when jax is imported, so this
  works from a script's main() as long as nothing has touched a device before.
  """
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")] +
      ["--xla_force_host_platform_device_count=1"])
  if jax.device_count() != 1:
    raise RuntimeError(f"use_one_device(): JAX already started with {jax.device_count()} "
                       "devices; call it before anything uses a device")


def start(root: str) -> "Results":
  """A table script's main() opens with this: one device, quiet logs, its saved results."""
  use_one_device()
  logging.set_verbosity(logging.WARNING)
  return Results(root)


class Results:
  """A table script's finished runs, kept in `<root>/results.json`: a rerun skips them."""

  def __init__(self, root: str):
    os.makedirs(root, exist_ok=True)
    self.path = os.path.join(root, "results.json")
    self.data: dict[str, Any] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.data = json.load(f)

  def record(self, key: str, fn: Callable[..., Any], *args) -> Any:
    """`fn(*args)` under `key`, run and saved only if not already there."""
    if key not in self.data:
      self.data[key] = fn(*args)
      with open(self.path, "w") as f:
        json.dump(self.data, f, indent=1)
      print(key, self.data[key], flush=True)
    return self.data[key]

  def write(self, text: str, name: str = "table.md") -> None:
    """Writes `text` beside results.json and prints it."""
    with open(os.path.join(os.path.dirname(self.path), name), "w", encoding="utf-8") as f:
      f.write(text)
    print(text)


def metrics_at(workdir: str, step: int) -> dict:
  """Everything a run logged at `step` (training row and evaluator results, merged)."""
  return next((r for r in metrics.read_metrics(workdir) if r["step"] == step), {})


def seconds_per_step(workdir: str) -> float:
  """Median logged step time: unlike wall time, not inflated if the process was paused."""
  times = [r["perf/seconds_per_step"] for r in metrics.read_metrics(workdir)
           if "perf/seconds_per_step" in r]
  return statistics.median(times) if times else float("nan")
