"""Optimisers, schedules and parameter freezing (optax)."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import traverse_util

from vlpre import sharding


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr`, then cosine (to `lr * end_factor`) or constant."""
  warmup = int(cfg.get("warmup_steps", 0))
  decay_steps = max(total_steps - warmup, 1)
  if cfg.get("schedule", "cosine") == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.get("end_factor", 0.0))
  elif cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"unknown schedule '{cfg.schedule}'")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """Decay only weights of rank ≥ 2 (matrices, kernels), never norms, biases or scalars."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


# Parameters before the first block (layer id 0 in layer-wise lr decay).
_EMBEDDING_NAMES = ("embed_tokens", "patch_embed", "pos_embedding", "cls", "token_embed")


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Layer-wise lr decay (BEiT / MAE fine-tuning of a pretrained backbone): a block at depth i of
  L gets its update scaled by decay^(L − i); embeddings (patch / token / position) by
  decay^(L + 1); what follows the blocks (final norm, heads) by 1. Stacked (scanned)
  weights get one factor per block along their leading axis. L counts the blocks among
  the weights being optimised (frozen blocks are not).
  """

  def update(updates, state, params=None):
    del params
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    paths = [[str(getattr(k, "key", getattr(k, "name", k))) for k in path] for path, _ in flat]
    ids = [sharding.block_indices(names, leaf.shape) for names, (_, leaf) in zip(paths, flat)]
    blocks = [i for x in ids if x is not None for i in (x if isinstance(x, list) else [x])]
    depth = max(blocks) + 1 if blocks else 0

    def scale(names, block, leaf):
      if block is None:
        exponent = depth + 1 if any(n in _EMBEDDING_NAMES for n in names) else 0
        return leaf * decay**exponent
      if isinstance(block, list):
        factors = np.array([decay**(depth - i) for i in block], np.float32)
        return leaf * factors.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
      return leaf * decay**(depth - block)

    scaled = [scale(n, b, leaf) for n, b, (_, leaf) in zip(paths, ids, flat)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(updates), scaled), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(cfg, total_steps)
  name = cfg.get("name", "adamw")
  if name == "adamw":
    tx = optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                     weight_decay=cfg.get("weight_decay", 0.0), mask=weight_decay_mask)
  elif name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(cfg.get("weight_decay", 0.0), mask=weight_decay_mask),
        optax.sgd(lr, momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False)))
  else:
    raise ValueError(f"unknown optimizer '{name}' (adamw | sgd)")
  layer_decay = float(cfg.get("layer_decay", 0.0) or 0.0)
  if layer_decay and layer_decay != 1.0:  # after the optimiser: a per-block learning rate
    tx = optax.chain(tx, scale_by_layer_decay(layer_decay))
  if cfg.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, lr


def split_frozen(tree: Any, patterns: Sequence[str],
                 trainable_patterns: Sequence[str] | None = None) -> tuple[dict, dict]:
  """Splits a params tree into (trainable, frozen) by regexes over 'a/b/c' paths.

  A path is frozen when it matches `patterns`, or, if `trainable_patterns` is given
  (not None), when it matches none of those.
  """
  flat = traverse_util.flatten_dict(tree, sep="/")

  def is_frozen(path):
    if sharding.matches_any(patterns, path):
      return True
    return trainable_patterns is not None and not sharding.matches_any(trainable_patterns, path)

  trainable = {k: v for k, v in flat.items() if not is_frozen(k)}
  frozen = {k: v for k, v in flat.items() if is_frozen(k)}
  for kind, group in (("freeze", patterns), ("trainable", trainable_patterns or ())):
    for pattern in group:
      if not any(sharding.matches_any([pattern], k) for k in flat):
        raise ValueError(f"{kind} pattern '{pattern}' matches no parameter")
  return (traverse_util.unflatten_dict(trainable, sep="/"),
          traverse_util.unflatten_dict(frozen, sep="/"))


def merge(trainable: dict, frozen: dict) -> dict:
  flat = traverse_util.flatten_dict(trainable, sep="/")
  flat.update(traverse_util.flatten_dict(frozen, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")
