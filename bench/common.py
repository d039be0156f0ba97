"""What the benchmark scripts share. Import it first: it must set XLA_FLAGS before jax loads.

    import common  # bench/ is the script's folder, so it is on sys.path
    common.use_one_device()
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `import vlpre` from a checkout that is not pip-installed


def use_one_device() -> None:
  """One JAX CPU device: small runs gain nothing from 8 fake devices on 2 cores."""
  if "jax" in sys.modules:
    raise RuntimeError("use_one_device() must run before jax is imported")
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")] +
      ["--xla_force_host_platform_device_count=1"])


class Results:
  """A table script's finished runs, kept in `<root>/results.json`: a rerun skips them."""

  def __init__(self, root: str):
    import json  # pylint: disable=g-import-not-at-top
    self._json = json
    os.makedirs(root, exist_ok=True)
    self.path = os.path.join(root, "results.json")
    self.data: dict = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.data = json.load(f)

  def record(self, key: str, fn, *args) -> dict:
    """`fn(*args)` under `key`, run and saved only if not already there."""
    if key not in self.data:
      self.data[key] = fn(*args)
      with open(self.path, "w") as f:
        self._json.dump(self.data, f, indent=1)
      print(key, self.data[key], flush=True)
    return self.data[key]


def metrics_at(workdir: str, step: int) -> dict:
  """Everything a run logged at `step` (training row and evaluator results, merged)."""
  from vlpre import metrics  # pylint: disable=g-import-not-at-top
  return next((r for r in metrics.read_metrics(workdir) if r["step"] == step), {})


def seconds_per_step(workdir: str) -> float:
  """Median logged step time: unlike wall time, not inflated if the process was paused."""
  import statistics  # pylint: disable=g-import-not-at-top
  from vlpre import metrics  # pylint: disable=g-import-not-at-top
  times = [r["perf/seconds_per_step"] for r in metrics.read_metrics(workdir)
           if "perf/seconds_per_step" in r]
  return statistics.median(times) if times else float("nan")
