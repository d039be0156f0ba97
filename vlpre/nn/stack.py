"""vlpre's one stack of transformer blocks (the ViT / text tower's Encoder, the LLM Decoder).

`stack` runs `depth` blocks as scanned groups (parameters stacked on the logical axis
`layers`: compile time flat in depth) or as one parameter subtree per block, with a
rematerialisation policy, a scan unroll factor and drop-path rates. Parameter names:
  scan=False                    <layer_name>_0, <layer_name>_1, ...   (one subtree per block)
  scan=True                     <name>                                (stacked [R, ...])
  scan=True, groups=(4, 26)     <name>_0to3, <name>_4to29              (one stack per group)
so a regex freezes "the first N" or "the last N" blocks when N is a group boundary.

A block is a Linen module class called `block(x, *broadcast, layer_inputs) -> (x, ys)`:
x is the carry, `broadcast` is the same for every block, layer_inputs is
(this block's slice of the group's inputs, its drop-path rate), and ys is what the block
emits per layer (stacked over the group by the scan).

Shape letters: R blocks (depth), n blocks of one group.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpre.nn import platform

# Rematerialisation policies (`remat=`): what a block's backward pass may keep from its
# forward pass instead of recomputing it.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block's input
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve_unroll(unroll: int | bool | None, depth: int) -> int:
  """Blocks per iteration of the scanned layer loop: None ("auto") unrolls it fully on
  CPU, where the unrolled program runs faster (bench/README.md), and keeps one block
  per iteration on GPU/TPU (smallest program, compile time flat in depth)."""
  if unroll is None:
    unroll = platform.backend() == "cpu"
  if isinstance(unroll, bool):
    return depth if unroll else 1
  if not 1 <= unroll <= depth:
    raise ValueError(f"unroll={unroll} must be in [1, depth={depth}]")
  return int(unroll)


def layer_groups(depth: int, scan: bool, groups: Sequence[int] = (), *, name: str = "layers",
                 layer_name: str = "layers") -> list[tuple[str, int, int, bool]]:
  """[(parameter name, first block, number of blocks, scanned)] of a stack's blocks."""
  if not scan:
    return [(f"{layer_name}_{i}", i, 1, False) for i in range(depth)]
  if not groups:
    return [(name, 0, depth, True)]
  if sum(groups) != depth or min(groups) < 1:
    raise ValueError(f"layer_groups {tuple(groups)} must be positive and sum to the {depth} layers")
  out, start = [], 0
  for size in groups:
    out.append((f"{name}_{start}to{start + size - 1}", start, size, True))
    start += size
  return out


def drop_path(branch: jax.Array, rate: jax.Array | float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drops the residual branch per sample (leading axis) with `rate`
  and rescales the kept ones by 1 / (1 − rate)."""
  keep = 1.0 - rate
  keep_Bx1 = jax.random.bernoulli(rng, keep, (branch.shape[0],) + (1,) * (branch.ndim - 1))
  return jnp.where(keep_Bx1, branch / keep, 0.0).astype(branch.dtype)


def stack(block: type[nn.Module], block_kwargs: dict[str, Any], x: Any, *broadcast: Any,
          depth: int, scan: bool = True, groups: Sequence[int] = (), remat: str = "none",
          static_argnums: tuple[int, ...] = (), unroll: int | bool | None = 1,
          drop_path_rate: float = 0.0,
          group_inputs: Callable[[int, int, int], Any] | None = None,
          name: str = "layers", layer_name: str = "layers") -> tuple[Any, list[Any]]:
  """Runs `depth` blocks over `x`; call it inside the parent's `nn.compact` method, whose
  parameter tree then holds the blocks under the names of `layer_groups`.

  Args:
    block, block_kwargs: the block class and its attributes (the same for every block).
    x, broadcast: the carry and the block arguments shared by every block.
    depth, scan, groups, name, layer_name: the layout (`layer_groups`).
    remat: a key of REMAT_POLICIES; `static_argnums` are the block arguments nn.remat
      must see as Python values (counting `self` as 0).
    unroll: blocks per scan iteration (resolve_unroll, per group).
    drop_path_rate: the last block's drop-path rate; rates rise linearly from 0 at the
      first block (DeiT / BEiT). The block applies it (`drop_path`).
    group_inputs: (group index, first block, count) -> a pytree stacked over the group's
      blocks [n, ...] (None: nothing per block).
  Returns:
    (x after the last block, [per group: the blocks' ys stacked [n, ...]]).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} not in {sorted(REMAT_POLICIES)}")
  policy = REMAT_POLICIES[remat]
  outputs = []
  for group, (group_name, first, count, scanned) in enumerate(
      layer_groups(depth, scan, groups, name=name, layer_name=layer_name)):
    block_cls = block
    if policy is not None:
      block_cls = nn.remat(block, policy=policy, prevent_cse=not scanned,
                           static_argnums=static_argnums)
    inputs = None if group_inputs is None else group_inputs(group, first, count)
    rates_n = drop_path_rate * np.arange(first, first + count) / max(depth - 1, 1)
    if scanned:
      scanned_cls = nn.scan(block_cls, variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast,) * len(broadcast) + (0,), length=count,
                            unroll=resolve_unroll(unroll, count),
                            metadata_params={nn.PARTITION_NAME: "layers"})
      x, ys = scanned_cls(name=group_name, **block_kwargs)(
          x, *broadcast, (inputs, jnp.asarray(rates_n, jnp.float32)))
    else:
      layer_inputs = None if inputs is None else jax.tree.map(lambda a: a[0], inputs)
      x, ys = block_cls(name=group_name, **block_kwargs)(
          x, *broadcast, (layer_inputs, float(rates_n[0])))
      ys = jax.tree.map(lambda a: a[None], ys)
    outputs.append(ys)
  return x, outputs
