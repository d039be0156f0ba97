"""SmolLM2-135M: compile time and step time, layers scanned vs unrolled, one run.

    XLA_FLAGS= python bench/llm_forward.py [--batch 64] [--length 77]

"unrolled" is how vlpre's decoder ran before vlpre/llm (a Python loop over the 30
layers, one parameter subtree each); "scanned" is the default now (one compiled block,
parameters stacked on load). Two workloads: the frozen LIFT text encoder's pooled
forward pass over a batch of captions, and a training step of the decoder itself
(next-token loss, gradients of every weight: what LCL / HIVE / bridge training pay).
Compile time is jit lowering + XLA compilation;
step time the median of `--repeats` runs after one warm-up. Rows run one after another
in this process, nothing else running.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from vlpre import text_encoders


def measure(scan: bool, batch: int, length: int, repeats: int) -> dict[str, float]:
  encoder = text_encoders.load_text_encoder("smollm2-135m", max_len=length, scan=scan)
  rng = np.random.default_rng(0)
  ids_BxL = rng.integers(3, 49152, size=(batch, length)).astype(np.int32)
  mask_BxL = np.ones((batch, length), np.int32)
  variables = jax.device_put({"params": encoder.params})
  start = time.perf_counter()
  compiled = jax.jit(encoder.module.apply).lower(variables, ids_BxL, mask_BxL).compile()
  compile_s = time.perf_counter() - start
  compiled(variables, ids_BxL, mask_BxL).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(variables, ids_BxL, mask_BxL).block_until_ready()
    times.append(time.perf_counter() - start)
  return {"compile_s": compile_s, "step_s": statistics.median(times)}


def measure_train(scan: bool, batch: int, length: int, repeats: int) -> dict[str, float]:
  from vlpre import llm as llm_lib  # pylint: disable=g-import-not-at-top
  from vlpre import losses  # pylint: disable=g-import-not-at-top
  smollm2 = llm_lib.load("smollm2-135m", scan=scan)
  ids_BxL = np.random.default_rng(0).integers(3, 49152, size=(batch, length)).astype(np.int32)

  def loss_fn(params):
    out = smollm2.module.apply({"params": params}, ids_BxL, return_logits=True)
    return losses.next_token_cross_entropy(out.logits[:, :-1], ids_BxL[:, 1:],
                                           np.ones((batch, length - 1), np.float32))[0]

  params = jax.device_put(smollm2.params)
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params))
    times.append(time.perf_counter() - start)
  return {"compile_s": compile_s, "step_s": statistics.median(times)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=77)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--train_batch", type=int, default=8)
  parser.add_argument("--train_length", type=int, default=32)
  args = parser.parse_args()
  rows = {}
  for name, scan in (("unrolled (before)", False), ("scanned (now)", True)):
    rows[("forward", name)] = measure(scan, args.batch, args.length, args.repeats)
    rows[("train", name)] = measure_train(scan, args.train_batch, args.train_length, args.repeats)
  print(f"SmolLM2-135M, {jax.device_count()} device(s), {jax.devices()[0].platform}: pooled "
        f"forward over {args.batch} × {args.length} tokens; LM train step (loss + gradients) "
        f"over {args.train_batch} × {args.train_length} tokens")
  print("| workload | decoder layers | compile s | s/step |")
  print("|---|---|---|---|")
  for (kind, name), r in rows.items():
    print(f"| {kind} | {name} | {r['compile_s']:.1f} | {r['step_s']:.3f} |")
  for kind in ("forward", "train"):
    before, now = rows[(kind, "unrolled (before)")], rows[(kind, "scanned (now)")]
    print(f"{kind}: scanned ÷ unrolled: compile {now['compile_s'] / before['compile_s']:.2f}×, "
          f"step {now['step_s'] / before['step_s']:.2f}×")


if __name__ == "__main__":
  main()
