"""Per-layer share of outlier weights (|w| > threshold): language- vs vision-trained blocks.

    python -m vlpre.methods.bridge.analyze_outliers --out=workdirs/outliers \
        [--llm=smollm2-135m] [--num_layers=4] \
        [--bridge_workdir=workdirs/bridge_tiny] [--vit_workdir=workdirs/clip_tiny]

Bridge training's analysis (arXiv 2604.01833): language- and vision-pretrained weights
differ in how many of them are large. For each transformer block it reports the share of
matrix weights (kernels of the attention and MLP projections; norm scales and biases are
left out: RMSNorm gains sit near or above 1 by design) whose magnitude exceeds the
threshold, for
  * the pretrained LLM's blocks (vlpre.llm),
  * the same blocks after bridge training (the `llm` subtree of a bridge run's latest
    checkpoint; blocks frozen by partial bridging are not in it, they equal the
    pretrained ones),
  * a vision-trained ViT from a vlpre run (its `img` tower, e.g. CLIP or LIFT).
Writes `outliers.md` (a table, one row per block) and `outliers.png` (one line per model).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from absl import app
from absl import flags
import numpy as np
from flax import traverse_util

from vlpre import checkpoint
from vlpre import llm as llm_lib
from vlpre import sharding


def block_outlier_shares(params: Mapping[str, Any], threshold: float = 1.0) -> list[float]:
  """Share of |w| > threshold among each block's matrix weights, in block order.

  Understands vlpre's layouts: stacked groups (`layers`, `layers_0to9`, a ViT's scanned
  `blocks`, leading axis = block) and one subtree per block (`layers_3`, `block_3`).
  """
  counts: dict[int, list[int]] = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    value = np.asarray(value)
    blocks = sharding.block_indices([str(p) for p in path], value.shape)
    if blocks is None:
      continue  # embeddings, heads, final norms: not blocks
    stacked = isinstance(blocks, list)
    if value.ndim - stacked < 2:
      continue  # norm scales and biases
    slices = list(zip(blocks, value)) if stacked else [(blocks, value)]
    for block, w in slices:
      total = counts.setdefault(block, [0, 0])
      total[0] += int((np.abs(w) > threshold).sum())
      total[1] += int(w.size)
  return [counts[b][0] / counts[b][1] for b in sorted(counts)]


def _latest_params(workdir: str, prefix: str) -> Any:
  return checkpoint.restore_params(workdir, [prefix], what="--workdir")[prefix]


def analyze(out_dir: str, *, llm: str = "smollm2-135m", num_layers: int = 0,
            bridge_workdir: str = "", vit_workdir: str = "", threshold: float = 1.0) -> dict:
  rows: dict[str, list[float]] = {}
  pretrained = llm_lib.load(llm, num_layers=num_layers or None, tokens=False, lm_head=False)
  rows[f"{llm} (pretrained)"] = block_outlier_shares(pretrained.params, threshold)
  if bridge_workdir:
    rows[f"{llm} after bridging ({os.path.basename(bridge_workdir.rstrip('/'))})"] = (
        block_outlier_shares(_latest_params(bridge_workdir, "llm"), threshold))
  if vit_workdir:
    rows[f"ViT ({os.path.basename(vit_workdir.rstrip('/'))})"] = block_outlier_shares(
        _latest_params(vit_workdir, "img"), threshold)
  os.makedirs(out_dir, exist_ok=True)
  depth = max(len(v) for v in rows.values())
  lines = [f"Share of matrix weights with |w| > {threshold} per block (%).", "",
           "| block | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
  for b in range(depth):
    cells = [f"{100 * v[b]:.4f}" if b < len(v) else "" for v in rows.values()]
    lines.append(f"| {b} | " + " | ".join(cells) + " |")
  with open(os.path.join(out_dir, "outliers.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib  # pylint: disable=g-import-not-at-top  (optional: plots only)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top  (optional: plots only)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, shares in rows.items():
    ax.plot(range(len(shares)), [100 * s for s in shares], marker="o", label=name)
  ax.set_xlabel("block")
  ax.set_ylabel(f"% of weights with |w| > {threshold}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "outliers.png"), dpi=120)
  plt.close(fig)
  return rows


def main(argv):
  del argv
  analyze(_OUT.value, llm=_LLM.value, num_layers=_NUM_LAYERS.value,
          bridge_workdir=_BRIDGE.value, vit_workdir=_VIT.value, threshold=_THRESHOLD.value)
  with open(os.path.join(_OUT.value, "outliers.md"), encoding="utf-8") as f:
    print(f.read())


if __name__ == "__main__":
  # Flags are defined here, not on import: other modules define flags of the same names.
  _OUT = flags.DEFINE_string("out", "workdirs/outliers", "where outliers.md / outliers.png go")
  _LLM = flags.DEFINE_string("llm", "smollm2-135m", "the pretrained decoder")
  _NUM_LAYERS = flags.DEFINE_integer("num_layers", 0, "its first N blocks (0: all)")
  _BRIDGE = flags.DEFINE_string("bridge_workdir", "", "a bridge run (its `llm` weights)")
  _VIT = flags.DEFINE_string("vit_workdir", "", "a vlpre run with an `img` ViT (CLIP, LIFT)")
  _THRESHOLD = flags.DEFINE_float("threshold", 1.0, "|w| above this is an outlier")
  app.run(main)
