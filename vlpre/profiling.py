"""`config.profile_steps`: a jax.profiler trace of a few training steps, for TensorBoard.

    config.profile_steps = (11, 13)   # trace steps 11, 12 and 13; () traces nothing

The trace goes to `<workdir>/tensorboard/plugins/profile/<time>/<host>.xplane.pb` (and a
`.trace.json.gz` for Perfetto), beside the scalars, so `tensorboard --logdir
<workdir>/tensorboard` shows it in its Profile tab (with the `tensorboard-plugin-profile`
package installed). Every process traces its own host. Start after the first steps:
step 1 includes compilation.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax


def steps_problem(steps: Any) -> str | None:
  """Why `steps` is not a valid `profile_steps` value, or None: () or (first, last)."""
  if not steps:
    return None
  try:
    first, last = (int(s) for s in steps)
  except (TypeError, ValueError):
    return f"must be () or (first, last) steps, got {steps!r}"
  if not 1 <= first <= last:
    return f"must satisfy 1 <= first <= last, got {tuple(steps)!r}"
  return None


class StepProfiler:
  """Starts a jax.profiler trace before step `first` and stops it after step `last`.

  `before(step)` runs before the step is dispatched, `after(step, outputs)` once it is:
  the trace stops only when `outputs` are ready, so it holds the whole last step. Each
  traced step carries a `StepTraceAnnotation`, TensorBoard's step marker.
  """

  def __init__(self, steps: Sequence[int], workdir: str):
    problem = steps_problem(steps)
    if problem:
      raise ValueError(f"profile_steps: {problem}")
    self.first, self.last = (int(s) for s in steps) if steps else (0, -1)
    self.log_dir = os.path.join(workdir, "tensorboard")
    self._active = False
    self._annotation = None

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.log_dir)
      self._active = True
      logging.info("profiling steps %d-%d into %s/plugins/profile", self.first, self.last,
                   self.log_dir)
    if self._active:
      self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
      self._annotation.__enter__()

  def after(self, step: int, outputs: Any) -> None:
    if not self._active:
      return
    self._annotation.__exit__(None, None, None)
    self._annotation = None
    if step >= self.last:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    """Stops a trace still running (a stop request or an error inside the window)."""
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if self._active:
      self._active = False
      jax.profiler.stop_trace()
