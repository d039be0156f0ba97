"""The console progress: the plain line off a terminal, a tqdm bar on one (a pseudo-terminal)."""
import fcntl
import io
import logging as std_logging
import os
import re
import select
import struct
import termios

from absl import logging

from vlpre import metrics

LINE = re.compile(r"^step 2/4 \| loss 1\.2340 \| [\d.]+ img/s \| [\d.]+ s/step \| eta \d+m\d\ds$")


def _progress_lines(caplog):
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]


def test_off_a_terminal_the_plain_line_as_before(caplog):
  caplog.set_level(std_logging.INFO)
  stream = io.StringIO()
  for progress in (metrics.Progress(4, 8, stream=stream),
                   metrics.Progress(4, 8)):  # sys.stderr under pytest is not a terminal
    perf = progress.report(2, 1.234)
    assert set(perf) == {"perf/images_per_second", "perf/seconds_per_step"}
  lines = _progress_lines(caplog)
  assert len(lines) == 2 and all(LINE.match(line) for line in lines), lines
  assert stream.getvalue() == ""  # no bar drawn


def _read_all(master):
  """Everything written to the pseudo-terminal so far.

  The kernel hands the written bytes to the master side asynchronously, so one read
  can return only the first write: read until a second passes with nothing new.
  """
  chunks = []
  while select.select([master], [], [], 1.0)[0]:
    chunks.append(os.read(master, 1 << 16))
  return b"".join(chunks).decode()


def test_on_a_terminal_a_bar_with_log_lines_above_it(caplog):
  caplog.set_level(std_logging.INFO)
  master, slave = os.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 x 120
  try:
    with os.fdopen(slave, "w") as stream:
      progress = metrics.Progress(4, 8, start_step=1, stream=stream)
      progress.report(2, 1.234)
      logging.info("an eval result")
      progress.report(4, 1.0)
      assert not any(isinstance(f, metrics._LogsAboveBar)  # pylint: disable=protected-access
                     for f in logging.get_absl_logger().filters)  # the finished bar let go
      logging.info("after the bar")
      stream.flush()
      out = _read_all(master)
  finally:
    os.close(master)
  assert re.search(r"step 2/4 \|[^|\r\n]*\| loss 1\.2340 \| [\d.]+ img/s \| [\d.]+ s/step", out), out
  assert re.search(r"step 4/4 \|█+\| loss 1\.0000", out), out
  assert "an eval result" in out and out.index("an eval result") < out.index("step 4/4")
  assert _progress_lines(caplog) == []  # the bar replaced the line
  # A record printed above the bar does not also reach the handlers; one after it does.
  assert [r.getMessage() for r in caplog.records] == ["after the bar"]
