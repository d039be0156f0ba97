"""Runs a run's evaluators on the latest checkpoint of its workdir.

    python -m vlpre.evaluate --workdir=workdirs/clip_tiny [--config.evals.x.max_examples=64]
    python -m vlpre.evaluate --config=configs/clip.py:tiny --workdir=workdirs/clip_tiny
    python -m vlpre.evaluate --config=configs/clip.py:tiny,hard_negatives \
        --workdir=workdirs/clip_tiny --only=hard_negatives_flickr8k   # one evaluator

Without --config the config is the one the run recorded in its config.json
(vlpre/run_record.py); `--config.x=y` overrides it. The model is built on zeros in the
input shapes recorded there, so no training data is read: only the evaluators' sets.
(A run from before runs recorded them reads one training batch for the shapes.)
Results are printed, and appended to workdir/metrics_eval.jsonl at the checkpoint's step:
not to metrics.jsonl, which a trainer may be writing meanwhile (in a bucket each writer
rewrites its file whole). `metrics.read_metrics` and vlpre.compare read both files.
A multi-host run starts one process per host with the same arguments, as vlpre.main
(vlpre/distributed.py: --coordinator_address/--num_processes/--process_id, or the
environment); process 0 prints and writes the results.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax

from vlpre import checkpoint as checkpoint_lib
from vlpre import config_lib
from vlpre import data as data_lib
from vlpre import distributed
from vlpre import evaluators as evaluators_lib
from vlpre import metrics as metrics_lib
from vlpre import methods
from vlpre import run_record
from vlpre import sharding
from vlpre import train_state


def evaluate(config, workdir: str, step: int | None = None,
             only: Sequence[str] = ()) -> dict[str, float]:
  """Restores `step` (default: latest) of `workdir` and runs every `config.evals` entry
  (those named in `only`, if given)."""
  config = config_lib.with_workdir(config, workdir)  # the run's text store, as it trained
  evals = dict(config.get("evals", {}))
  if unknown := [name for name in only if name not in evals]:
    raise ValueError(f"--only: no evaluator {', '.join(unknown)} in the config; it has "
                     f"{', '.join(evals) or 'none'}")
  if only:
    evals = {name: evals[name] for name in only}
  tokenizer = methods.build_tokenizer(config)
  example = run_record.input_batch(workdir)  # the input shapes the model was built on
  if example is None:
    logging.info("%s records no input shapes (a run from before it did): reading one training "
                 "batch for them", run_record.path(workdir))
    extras = methods.input_extras(config)
    example = next(iter(data_lib.build_train_dataset(
        config.input, global_batch_size=config.batch_size, seed=config.seed,
        tokenizer=tokenizer if extras.tokenize else None, extra_transforms=extras.transforms,
        extra_keys=extras.keys, stream=extras.stream, records=extras.records)))
  # The state's weights come from the checkpoint.
  s = train_state.setup(config, example, restoring=True)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = step if step is not None else ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  state = ckpt.restore_state_only(step, train_state.with_shardings(s.state, s.state_shardings))
  ckpt.close()
  results = {}
  with sharding.active(s.mesh, s.rules):
    for evaluator in evaluators_lib.build_evaluators(evals, s, tokenizer=tokenizer):
      results.update(evaluator.run(s.variables(state)))
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False,
                                    filename=metrics_lib.EVAL_METRICS_FILE,
                                    is_main_process=jax.process_index() == 0)
  writer.write(step, results)
  writer.close()
  return results


def main(argv, config_flag, workdir_flag, step_flag, distributed_flags=None, only_flag=None):
  del argv
  if distributed_flags is not None:  # before any other JAX call
    distributed_flags.initialize()
  logging.set_verbosity(logging.INFO)
  results = evaluate(config_flag.value, workdir_flag.value, step_flag.value,
                     only=only_flag.value if only_flag is not None else ())
  if jax.process_index() == 0:
    print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
  # Flags are defined here, not at import: tests and vlpre.main import this module.
  _CONFIG = run_record.define_config_flag(sys.argv)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the run to evaluate.")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  _ONLY = flags.DEFINE_list("only", [], "Run only these of config.evals (default: all).")
  _DISTRIBUTED = distributed.Flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(lambda argv: main(argv, _CONFIG, _WORKDIR, _STEP, _DISTRIBUTED, _ONLY))
