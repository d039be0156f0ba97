"""Metric sinks (JSONL + TensorBoard, optionally Weights & Biases), the console progress
(a bar on a terminal, else a line), a quiet console."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging as std_logging
import math
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
from tensorboardX import event_file_writer
from tensorboardX import record_writer
from tensorboardX import summary
from tensorboardX.proto import event_pb2
import tqdm

from vlpre import storage


class VlpreInfoOnly(std_logging.Filter):
  """Keeps INFO lines that vlpre's own modules write; every WARNING and ERROR passes, a
  library's without its traceback.

  The libraries under the trainer (orbax, absl, grain, jax) log through the absl logger
  or their own loggers, and their INFO lines drown the progress line (about 95% of a
  run's console). The module that wrote a line decides: a library's own logger by its
  name (`jax._src.xla_bridge`); absl's, which names every record "absl", by the module
  loaded from the record's source file. It must be `vlpre` or a submodule, or the script
  being run (`__main__`, e.g. a bench script calling `quiet_console`). A file's place on
  disk does not decide: a checkout named `vlpre` with its venv inside puts every
  library's files under a folder named vlpre.
  """

  def __init__(self):
    super().__init__()
    self._module_of: dict[str, str] = {}  # source file -> module name ("" if none)

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.WARNING:
      return self._from_vlpre(record)
    if record.exc_info and not self._from_vlpre(record):
      # A library's traceback (orbax logs a failed write's): the failure reaches vlpre,
      # which ends the run with one line; --verbose_logs shows the traceback.
      record.exc_info = record.exc_text = None
    return True

  def _from_vlpre(self, record: std_logging.LogRecord) -> bool:
    if record.name != logging.get_absl_logger().name:
      module = record.name
    else:
      module = self._module_of.get(record.pathname)
      if module is None:
        module = self._module_of[record.pathname] = _module_of_file(record.pathname)
    return module == "__main__" or module == "vlpre" or module.startswith("vlpre.")


def _module_of_file(path: str) -> str:
  """The name of the loaded module whose source is `path`; "" when none is."""
  want = os.path.normcase(os.path.abspath(path))
  for name, module in list(sys.modules.items()):
    file = getattr(module, "__file__", None)
    if file and os.path.normcase(os.path.abspath(file)) == want:
      return name
  return ""


def quiet_console(verbose: bool = False) -> None:
  """Quiet by default: vlpre's own INFO lines (progress, eval results) and all warnings;
  `verbose` shows every library's INFO lines too."""
  logging.set_verbosity(logging.INFO)
  # absl's logger's filter sees every record it creates; its handler's, the records of
  # the libraries' own loggers too, which reach it through the root logger.
  for target in (logging.get_absl_logger(), logging.get_absl_handler()):
    for f in [f for f in target.filters if isinstance(f, VlpreInfoOnly)]:
      target.removeFilter(f)
    if not verbose:
      target.addFilter(VlpreInfoOnly())


def format_results(values: Mapping[str, float]) -> str:
  """'retrieval/i2t_R@1 0.0150 | retrieval/t2i_R@1 0.0120' for the console."""
  return " | ".join(f"{k} {v:.4g}" for k, v in values.items())


METRICS_FILE = "metrics.jsonl"  # the trainer's rows
# vlpre.evaluate's rows: a file of its own, since it may run beside the trainer, and a
# bucket object is rewritten whole on every write (the writers would erase each other's rows).
EVAL_METRICS_FILE = "metrics_eval.jsonl"


class MetricsWriteError(OSError):
  """Metrics could not be written (a full disk, an I/O error); the message is one line."""


class WandbSink:
  """Sends metric rows to Weights & Biases: `config.wandb.enabled`, off by default.

  wandb is an optional extra (`pip install -e ".[wandb]"`), imported only here. Offline by
  default (`mode="offline"`: the run is written under `<workdir>/wandb/`, uploaded later
  with `wandb sync`), so a machine without a network trains as usual. The run id comes
  from the workdir, so a resumed run continues the same wandb run. If wandb cannot start
  (no login for "online", no network), the run goes on without it, with a warning.
  """

  def __init__(self, cfg: Mapping[str, Any], workdir: str, run_config: Any = None):
    import wandb  # pylint: disable=g-import-not-at-top  # optional extra: only with wandb.enabled
    local = None if storage.is_uri(workdir) else os.path.abspath(workdir)
    run_id = cfg.get("id") or hashlib.sha1(
        (local or str(workdir)).encode("utf-8")).hexdigest()[:16]
    if hasattr(run_config, "to_dict"):
      run_config = run_config.to_dict()
    try:
      self._run = wandb.init(
          project=cfg.get("project") or "vlpre", entity=cfg.get("entity") or None,
          name=cfg.get("name") or os.path.basename(os.path.normpath(str(workdir))),
          id=run_id, resume="allow", mode=cfg.get("mode") or "offline", dir=local,
          config=run_config)
    except Exception as e:  # pylint: disable=broad-except  (wandb raises many types)
      logging.warning("wandb could not start (%s: %s); metrics go to metrics.jsonl and "
                      "TensorBoard only", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
      self._run = None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if self._run is not None:
      self._run.log(dict(metrics), step=int(step))

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to workdir/metrics.jsonl, to TensorBoard, and,
  where `wandb` (a config's `wandb` section) is enabled, to Weights & Biases (`WandbSink`).

  The workdir is local or a `gs://` URI (`vlpre.storage`). A bucket object cannot be
  appended to, so there the file is rewritten whole (its earlier rows read once at
  start) on every write; locally lines are appended. `filename`: another file of the
  workdir (vlpre.evaluate writes `EVAL_METRICS_FILE`). A failed write (ENOSPC, EIO)
  raises `MetricsWriteError`; TensorBoard events are written in the caller's thread, so
  their failures surface there too. `run_config` is recorded with the wandb run.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, is_main_process: bool = True,
               filename: str = METRICS_FILE, wandb: Mapping[str, Any] | None = None,
               run_config: Any = None):
    self.enabled = is_main_process
    directory = storage.path(workdir, what="workdir")
    self.path = directory / filename
    self._tb = None
    self._file = None
    self._wandb = None
    self._failed = False
    self._lines: list[str] = []  # a URI's whole content, rewritten on every write
    if self.enabled and wandb and wandb.get("enabled"):
      self._wandb = WandbSink(wandb, workdir, run_config)
    if self.enabled:
      with self._write_errors("at start", self.path):
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
        logdir = os.fspath(directory / "tensorboard")
        with self._write_errors("at start", logdir):
          storage.use_epath_for_tensorboard()
          record_writer.directory_check(logdir)
          # SummaryWriter's own file name; its events are written by a background thread,
          # whose failures would be a traceback there and silence here.
          self._tb = event_file_writer.EventsWriter(os.path.join(logdir, "events"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled or not metrics:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    with self._write_errors(f"of step {step}", self.path):
      if self._file is not None:
        self._file.write(line)
        self._file.flush()
      else:
        self._lines.append(line)
        storage.write_atomic(self.path, "".join(self._lines))
    if self._tb is not None:
      with self._write_errors(f"of step {step}", self.path.parent / "tensorboard"):
        for name, value in clean.items():
          self._tb.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary.scalar(name, value)))
        self._tb.flush()
    if self._wandb is not None:
      self._wandb.write(step, clean)

  def close(self) -> None:
    if not self.enabled:
      return
    try:
      with self._write_errors("at close", self.path):
        if self._file is not None:
          self._file.close()
        if self._tb is not None:
          self._tb.close()
      if self._wandb is not None:
        self._wandb.close()
    except MetricsWriteError:
      if not self._failed:
        raise
      # After a failed write the run is already ending with that write's line.

  @contextlib.contextmanager
  def _write_errors(self, what: str, target: Any):
    try:
      yield
    except OSError as e:
      if self._failed:
        raise MetricsWriteError(f"metrics could not be written to {target}") from e
      self._failed = True
      reason = e.strerror or str(e) or type(e).__name__
      raise MetricsWriteError(
          f"metrics {what} could not be written to {target} ({reason}); stopping. The "
          f"complete checkpoints are intact: fix the cause and rerun to resume from the "
          f"latest") from e


def _ends_with_newline(path) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_lines(workdir: str, files: tuple[str, ...] = (METRICS_FILE, EVAL_METRICS_FILE)
               ) -> list[dict]:
  """The rows of a run's metric files as written (local or gs://): metrics.jsonl's, then
  vlpre.evaluate's metrics_eval.jsonl's (those of `files` that exist), each in order.

  A line cut off by a kill (the process died while writing it) is skipped: the resumed
  run writes that row again (it retrains the steps after its checkpoint and reruns the
  evaluators whose results are missing at the step it resumes from).
  """
  directory = storage.path(workdir, what="workdir")
  paths = [directory / name for name in files]
  if not any(p.exists() for p in paths):
    raise FileNotFoundError(f"no metrics at {paths[0]}")
  rows = []
  for path in paths:
    if not path.exists():
      continue
    for line in path.read_text(encoding="utf-8").splitlines():
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("%s: skipping a cut-off line %r", path, line[:80])
  return rows


def read_metrics(workdir: str, files: tuple[str, ...] = (METRICS_FILE, EVAL_METRICS_FILE)
                 ) -> list[dict]:
  """All metric rows of a run, one per step (its lines merged); later rows of a step win
  (a resumed run's, then vlpre.evaluate's). Cut-off lines are skipped (`read_lines`)."""
  rows: dict[int, dict] = {}
  for row in read_lines(workdir, files):
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
