"""SmolLM2-135M forward: compile time and step time, layers scanned vs unrolled, one run.

    XLA_FLAGS= python bench/llm_forward.py [--batch 64] [--length 77]

"unrolled" is how vlpre's decoder ran before vlpre/llm (a Python loop over the 30
layers, one parameter subtree each); "scanned" is the default now (one compiled block,
parameters stacked on load). Both are the frozen LIFT text encoder's work: a pooled
forward pass over a batch of captions. Compile time is jit lowering + XLA compilation;
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=77)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  rows = {name: measure(scan, args.batch, args.length, args.repeats)
          for name, scan in (("unrolled (before)", False), ("scanned (now)", True))}
  print(f"SmolLM2-135M pooled forward, batch {args.batch} × {args.length} tokens, "
        f"{jax.device_count()} device(s), {jax.devices()[0].platform}")
  print("| decoder layers | compile s | forward s/step |")
  print("|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['compile_s']:.1f} | {r['step_s']:.3f} |")
  before, now = rows["unrolled (before)"], rows["scanned (now)"]
  print(f"scanned ÷ unrolled: compile {now['compile_s'] / before['compile_s']:.2f}×, "
        f"step {now['step_s'] / before['step_s']:.2f}×")


if __name__ == "__main__":
  main()
