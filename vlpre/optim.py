"""Optimisers, schedules and parameter freezing (optax)."""
from __future__ import annotations

from typing import Any, Sequence

import jax
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
  if cfg.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx, lr


def split_frozen(tree: Any, patterns: Sequence[str]) -> tuple[dict, dict]:
  """Splits a params tree into (trainable, frozen) by regexes over 'a/b/c' paths."""
  flat = traverse_util.flatten_dict(tree, sep="/")
  trainable = {k: v for k, v in flat.items() if not sharding.matches_any(patterns, k)}
  frozen = {k: v for k, v in flat.items() if sharding.matches_any(patterns, k)}
  for pattern in patterns:
    if not any(sharding.matches_any([pattern], k) for k in flat):
      raise ValueError(f"freeze pattern '{pattern}' matches no parameter")
  return (traverse_util.unflatten_dict(trainable, sep="/"),
          traverse_util.unflatten_dict(frozen, sep="/"))


def merge(trainable: dict, frozen: dict) -> dict:
  flat = traverse_util.flatten_dict(trainable, sep="/")
  flat.update(traverse_util.flatten_dict(frozen, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")
