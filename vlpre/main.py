"""Entry point: `python -m vlpre.main --config=configs/X.py[:arg] --workdir=DIR [--config.a=b]`.

`--check` only validates the config (vlpre/check.py): one line per problem and exit 1,
or "config OK" and exit 0. Every run is checked the same way before anything is built.

Exit status: 0 when the run (every stage of a staged config) is finished; 143 (=
128 + SIGTERM, `--requeue_exit_code`) when a SIGTERM stopped it early, after saving its
last finished step: the scheduler should requeue the job, and the rerun resumes (a rerun
of a finished run is a no-op that exits 0); 1 for errors (a bad config, NaN loss, too
many bad samples, a checkpoint, metrics or TensorBoard write that failed, a data read
error, a workdir another trainer holds, a multi-process launch that cannot assemble, a
resume whose config differs from the run's config.json: vlpre/run_record.py and
`--allow_config_change`), each reported in one line, `vlpre: ...` (vlpre/fatal.py; the
traceback above it only with --verbose_logs).

Multi-process (multi-host) runs start one such process per host or per GPU, all with the
same arguments; vlpre/distributed.py says how the run is found (--coordinator_address,
--num_processes, --process_id, the JAX_* variables, or VLPRE_MULTIHOST=1 for TPU pods and
SLURM) and initialises jax.distributed before any other JAX call.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vlpre import check
from vlpre import config_lib
from vlpre import distributed
from vlpre import fatal
from vlpre import metrics
from vlpre import run_record
from vlpre import stages
from vlpre import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (see configs/).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
_CHECK = flags.DEFINE_bool("check", False, "Only check the config (vlpre/check.py) and exit.")
_REQUEUE_EXIT_CODE = flags.DEFINE_integer(
    "requeue_exit_code", 143, "Exit status after a SIGTERM stopped the run early (its last "
    "finished step saved): tells the scheduler to requeue. 143 = 128 + SIGTERM.")
_VERBOSE = flags.DEFINE_bool("verbose_logs", False, "Show the INFO lines of every library "
                             "(orbax, grain, jax), not only vlpre's progress and results, and "
                             "the traceback above a failure's one line.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "On resume, config fields that may differ from the run's "
    "config.json (FIELD, or a section such as optim; * for all), besides those that never "
    f"change a run: {', '.join(run_record.RESUMABLE)}.")
_DISTRIBUTED = distributed.Flags()
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  metrics.quiet_console(verbose=_VERBOSE.value)
  _DISTRIBUTED.initialize()  # before any other JAX call
  if not _CHECK.value and not _WORKDIR.value:
    raise app.UsageError("--workdir is required (except with --check)")
  problems = check.check_config(_CONFIG.value)
  if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
  if _CHECK.value:
    print("config OK")
    return
  run = stages.run if _CONFIG.value.get("stages") else train.run  # staged: vlpre/stages.py
  with fatal.one_line_errors(verbose=_VERBOSE.value):  # one line and exit 1 on a failure
    run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  if train.stop_requested():
    logging.warning("stopped by SIGTERM with the last finished step saved: exit status %d "
                    "(requeue); rerun the same command to resume", _REQUEUE_EXIT_CODE.value)
    sys.exit(_REQUEUE_EXIT_CODE.value)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
