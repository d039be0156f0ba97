"""Metric sinks (JSONL + TensorBoard), the console progress (a bar on a terminal, else a
line), a quiet console."""
from __future__ import annotations

import json
import logging as std_logging
import math
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
from tensorboardX import SummaryWriter
import tqdm

from vlpre import storage


class VlpreInfoOnly(std_logging.Filter):
  """Keeps INFO lines that vlpre itself writes; every WARNING and ERROR passes.

  The libraries under the trainer (orbax, absl, grain, jax) log through the same absl
  logger, and their INFO lines drown the progress line (about 95% of a run's console).
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, "/")
    return "/vlpre/" in path or "/bench/" in path


def quiet_console(verbose: bool = False) -> None:
  """Quiet by default: vlpre's own INFO lines (progress, eval results) and all warnings;
  `verbose` shows every library's INFO lines too."""
  logging.set_verbosity(logging.INFO)
  logger = logging.get_absl_logger()  # a logger's filter sees every record it creates
  for f in [f for f in logger.filters if isinstance(f, VlpreInfoOnly)]:
    logger.removeFilter(f)
  if not verbose:
    logger.addFilter(VlpreInfoOnly())


def format_results(values: Mapping[str, float]) -> str:
  """'retrieval/i2t_R@1 0.0150 | retrieval/t2i_R@1 0.0120' for the console."""
  return " | ".join(f"{k} {v:.4g}" for k, v in values.items())


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to workdir/metrics.jsonl and to TensorBoard.

  The workdir is local or a `gs://` URI (`vlpre.storage`). A bucket object cannot be
  appended to, so there the file is rewritten whole (its earlier rows read once at
  start) on every write; locally lines are appended.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, is_main_process: bool = True):
    self.enabled = is_main_process
    directory = storage.path(workdir, what="workdir")
    self.path = directory / "metrics.jsonl"
    self._tb = None
    self._file = None
    self._lines: list[str] = []  # a URI's whole content, rewritten on every write
    if self.enabled:
      directory.mkdir(parents=True, exist_ok=True)
      if storage.is_uri(self.path):
        if self.path.exists():
          text = self.path.read_text(encoding="utf-8")
          self._lines = [text + ("" if text.endswith("\n") else "\n")] if text else []
      else:
        self._file = self.path.open("a", encoding="utf-8")
        if self._file.tell() and not _ends_with_newline(self.path):
          self._file.write("\n")  # a line cut off by a kill stays alone on its line
      if tensorboard:
        storage.use_epath_for_tensorboard()
        self._tb = SummaryWriter(os.fspath(directory / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled or not metrics:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      storage.write_atomic(self.path, "".join(self._lines))
    if self._tb is not None:
      for name, value in clean.items():
        self._tb.add_scalar(name, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()


def _ends_with_newline(path) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_metrics(workdir: str) -> list[dict]:
  """All metric rows of a run; for a resumed run, later rows of a step win.

  A line cut off by a kill (the process died while writing it) is skipped: the resumed
  run writes that row again (it retrains the steps after its checkpoint and reruns the
  evaluators whose results are missing at the step it resumes from).
  """
  rows = {}
  path = storage.path(workdir, what="workdir") / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"no metrics at {path}")
  for line in path.read_text(encoding="utf-8").splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      logging.warning("metrics.jsonl: skipping a cut-off line %r", line[:80])
      continue
    rows.setdefault(row["step"], {}).update(row)
  return [rows[s] for s in sorted(rows)]


class Progress:
  """The run's progress on the console, at every call to `report`.

  On a terminal (`stream.isatty()`; the stream is sys.stderr, where absl logs) a tqdm
  bar redrawn in place, `step 120/500 |████▌     | loss 3.9120 | 41.3 img/s | 1.550
  s/step | eta 9m40s`, with vlpre's log lines (eval results, warnings) printed above it.
  Elsewhere (a file, a pipe, CI) the plain line, logged at INFO:
  'step 120/500 | loss 3.9120 | 41.3 img/s | 1.550 s/step | eta 9m40s'.
  `bar` forces one or the other.
  """

  def __init__(self, total_steps: int, batch_size: int, start_step: int = 0, *,
               stream: Any = None, bar: bool | None = None):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()
    stream = sys.stderr if stream is None else stream
    self._bar = self._logs_above_bar = None
    if _isatty(stream) if bar is None else bar:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=stream, mininterval=0,
                            dynamic_ncols=True, postfix=[""],
                            bar_format="step {n_fmt}/{total_fmt} |{bar}| {postfix[0]}")
      self._logs_above_bar = _LogsAboveBar(self._bar)
      logging.get_absl_logger().addFilter(self._logs_above_bar)

  def report(self, step: int, loss: float) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    eta = seconds_per_step * (self.total_steps - step)
    images_per_second = self.batch_size / max(seconds_per_step, 1e-9)
    if self._bar is None:
      logging.info("step %d/%d | loss %.4f | %.1f img/s | %.3f s/step | eta %s", step,
                   self.total_steps, loss, images_per_second, seconds_per_step, _format_eta(eta))
    else:
      self._bar.postfix[0] = (f"loss {loss:.4f} | {images_per_second:.1f} img/s | "
                              f"{seconds_per_step:.3f} s/step | eta {_format_eta(eta)}")
      self._bar.update(step - self._bar.n)
      if step >= self.total_steps:
        self.close()
    return {"perf/images_per_second": images_per_second, "perf/seconds_per_step": seconds_per_step}

  def close(self) -> None:
    """Leaves the bar as it is on the console; later log lines print below it."""
    if self._bar is not None:
      logging.get_absl_logger().removeFilter(self._logs_above_bar)
      self._bar.close()
      self._bar = None


def _isatty(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class _LogsAboveBar(std_logging.Filter):
  """While a bar is drawn, prints each absl record that would be shown above the bar
  (`tqdm.write` clears it, prints, redraws) instead of letting the handler print it over
  the bar. The logger's other filters (e.g. `VlpreInfoOnly`) still decide what shows."""

  def __init__(self, bar: Any):
    super().__init__()
    self._bar = bar

  def filter(self, record: std_logging.LogRecord) -> bool:
    logger, handler = logging.get_absl_logger(), logging.get_absl_handler()
    if any(not f.filter(record) for f in logger.filters if f is not self):
      return False
    if record.levelno >= handler.level:
      tqdm.tqdm.write(handler.format(record), file=self._bar.fp)
    return False


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
