"""vlpre's parameter layout against PyTorch's and against the per-block form converters use.

PyTorch stores a Linear as weight [out, in] (+ bias [out]) and a LayerNorm as weight/bias;
flax as kernel [in, out] (q/k/v DenseGeneral: [D, H, K]; the attention output: [H, K, D])
and scale/bias. A converter describes one encoder block as a dict of vlpre's submodule
names ("attn/query", "ln_mlp", ...) and `encoder` lays a list of them out as the tower's
`encoder` subtree (scanned: stacked on a leading depth axis; else block_i).

Shape letters: D width, H heads, K per-head dim, F MLP width, R blocks.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

# One encoder block's parameters by vlpre submodule ("module/sub").
BLOCK = ("ln_attn", "attn/query", "attn/key", "attn/value", "attn/out", "ln_mlp",
         "mlp/Dense_0", "mlp/Dense_1")


def f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def to_linear(p: dict, *, heads_in: bool = False) -> dict[str, np.ndarray]:
  """A flax Dense/DenseGeneral → torch Linear's weight [out, in] and bias [out].

  q/k/v kernels are [D, H, K] (contract the first axis), the attention output's
  [H, K, D] (`heads_in`: contract all but the last).
  """
  kernel = f32(p["kernel"])
  w = kernel.reshape(-1, kernel.shape[-1]) if heads_in else kernel.reshape(kernel.shape[0], -1)
  out = {"weight": w.T}
  if "bias" in p:
    out["bias"] = f32(p["bias"]).reshape(-1)
  return out


def from_linear(weight, bias=None, *, heads: int | None = None, heads_in: bool = False) -> dict:
  """A torch Linear → a flax Dense (heads=None), a q/k/v DenseGeneral [D, H, K] (heads),
  or the attention output [H, K, D] (heads with heads_in)."""
  kernel = f32(weight).T  # [in, out]
  bias = None if bias is None else f32(bias)
  if heads and heads_in:
    kernel = kernel.reshape(heads, -1, kernel.shape[-1])
  elif heads:
    kernel = kernel.reshape(kernel.shape[0], heads, -1)
    bias = None if bias is None else bias.reshape(heads, -1)
  return {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}


def to_norm(p: dict) -> dict[str, np.ndarray]:
  return {"weight": f32(p["scale"]), "bias": f32(p["bias"])}


def from_norm(weight, bias) -> dict[str, np.ndarray]:
  return {"scale": f32(weight), "bias": f32(bias)}


def put(state: dict, prefix: str, tensors: dict[str, np.ndarray]) -> None:
  """Adds `tensors` to a flat torch state dict under `prefix.`."""
  state.update({f"{prefix}.{k}": v for k, v in tensors.items()})


def blocks_of(encoder: dict, depth: int) -> list[dict]:
  """The `encoder` subtree's blocks, each {"attn": {...}, "ln_attn": ...}, scanned or not."""
  if "blocks" in encoder:
    return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], encoder["blocks"]) for i in range(depth)]
  return [encoder[f"block_{i}"] for i in range(depth)]


def encoder(blocks: list[dict], ln_final: dict, *, scan: bool) -> dict:
  """The tower's `encoder` subtree from per-block trees (vlpre.nn.layers.Encoder's names)."""
  out = ({"blocks": jax.tree.map(lambda *xs: np.stack(xs), *blocks)} if scan
         else {f"block_{i}": b for i, b in enumerate(blocks)})
  return {**out, "ln_final": ln_final}


def block_tree(entries: dict[str, dict]) -> dict:
  """{"attn/query": {...}, "ln_attn": {...}} → {"attn": {"query": ...}, "ln_attn": ...}."""
  tree: dict[str, Any] = {}
  for name, value in entries.items():
    module, _, sub = name.partition("/")
    if sub:
      tree.setdefault(module, {})[sub] = value
    else:
      tree[module] = value
  return tree


def block_entry(block: dict, name: str) -> dict:
  module, _, sub = name.partition("/")
  return block[module][sub] if sub else block[module]


def torch_block(block: dict, names: dict[str, str]) -> dict[str, np.ndarray]:
  """One vlpre block as torch tensors, {"<torch submodule>.weight": ...}: `names` maps the
  torch submodule to vlpre's (BLOCK)."""
  state: dict[str, np.ndarray] = {}
  for theirs, ours in names.items():
    p = block_entry(block, ours)
    put(state, theirs, to_norm(p) if ours.startswith("ln") else
        to_linear(p, heads_in=ours == "attn/out"))
  return state


def from_torch_block(get, names: dict[str, str], heads: int) -> dict:
  """One vlpre block from torch tensors: `get(name)` returns "<torch submodule>.<weight|bias>"
  (None for an absent bias)."""
  entries = {}
  for theirs, ours in names.items():
    if ours.startswith("ln"):
      entries[ours] = from_norm(get(f"{theirs}.weight"), get(f"{theirs}.bias"))
    else:
      multi = ours.startswith("attn/")
      entries[ours] = from_linear(get(f"{theirs}.weight"), get(f"{theirs}.bias"),
                                  heads=heads if multi else None, heads_in=ours == "attn/out")
  return block_tree(entries)
