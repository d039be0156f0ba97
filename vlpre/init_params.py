"""Where a run's parameters start, and full parameter trees out and back in.

`place_weights` puts into the freshly initialised tree the method's pretrained subtrees
(a frozen LLM, a text encoder) and then `config.init_from`: a full export of a previous
run (`params`), public weights (`weights`: open_clip, Hugging Face, big_vision), or the
trainable parameters of a run's checkpoint (`workdir`). `export_params` writes every
parameter, frozen ones included (a staged run's handover), where `load_params` reads it.
"""
from __future__ import annotations

from typing import Any

from absl import logging
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from vlpre import checkpoint as checkpoint_lib
from vlpre import methods
from vlpre import storage
from vlpre import weights


def place_weights(config, built: methods.Built, params: dict, shardings: dict) -> dict:
  """The initialised `params` with the method's pretrained subtrees and `config.init_from`."""
  if built.pretrained:
    params = place_pretrained(params, built.pretrained, shardings)
  if config.get("init_from") and config.init_from.get("params"):
    # Every parameter from a full export (`export_params`: a staged run's previous stage).
    params = place_pretrained(params, load_params(config.init_from.params), shardings)
  elif config.get("init_from") and config.init_from.get("weights"):
    # Public weights (open_clip, Hugging Face, big_vision), converted to the method's tree.
    logging.info("initialising from %s", config.init_from.weights)
    params = place_pretrained(params, weights.load(config), shardings)
  elif config.get("init_from") and config.init_from.get("workdir"):
    # A run's checkpoint holds its trainable parameters only: under a subtree the method
    # loads pretrained (e.g. a partially bridged LLM), the frozen rest stays as placed above.
    prefixes = tuple(config.init_from.prefixes)
    logging.info("initialising %s from %s", list(prefixes), config.init_from.workdir)
    params = place_pretrained(
        params, checkpoint_lib.restore_params(config.init_from.workdir, prefixes), shardings,
        partial_ok=tuple(built.pretrained or ()))
  return params


def export_params(path: str, params: Any) -> None:
  """Writes a full parameter tree (trainable and frozen) where `load_params` reads it."""
  checkpoint_lib.write_replicated_arrays_from_one_replica_in_one_process()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(storage.path(path, what="export_params_to"), params)
    checkpointer.wait_until_finished()


def load_params(path: str) -> dict[str, Any]:
  """A tree written by `export_params`, as host numpy arrays."""
  path = storage.path(path, what="init_from.params")
  if not path.is_dir():
    raise FileNotFoundError(f"init_from.params: no exported parameters at {path}")
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree.map(np.asarray, checkpointer.restore(path))


def place_pretrained(params: dict, pretrained: dict[str, Any], shardings: dict,
                     partial_ok: tuple[str, ...] = ()) -> dict:
  """Overwrites subtrees ('a/b' → tree) of the initialised params with pretrained weights.

  Every weight under a placed prefix must be given, except under the prefixes in
  `partial_ok` (subtrees already holding pretrained weights, which a partial tree updates).
  The tree is checked whole before anything is placed. Each replaced device array is
  deleted as its weight is placed, so the random init of a pretrained model and its
  weights are never in memory together; `params` is consumed (use the tree returned).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  flat_sh = traverse_util.flatten_dict(shardings, sep="/")
  placed = {}
  for prefix, tree in pretrained.items():
    entries = (traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict)
               else {"": tree})  # a single array placed at `prefix` itself
    for name, value in entries.items():
      key = f"{prefix}/{name}" if name else prefix
      if key not in flat:
        raise ValueError(f"pretrained weight '{key}' has no place in the model")
      if tuple(flat[key].shape) != tuple(np.shape(value)):
        raise ValueError(f"pretrained '{key}' has shape {np.shape(value)}, the model "
                         f"expects {flat[key].shape}")
      placed[key] = value
    missing = [k for k in flat if k.startswith(prefix + "/") and k[len(prefix) + 1:] not in entries]
    if missing and any(prefix == p or prefix.startswith(p + "/") for p in partial_ok):
      logging.info("pretrained '%s': %d weights given, %d kept as already placed", prefix,
                   len(entries), len(missing))
    elif missing:
      raise ValueError(f"pretrained '{prefix}' lacks {len(missing)} weights, e.g. {missing[:3]}")
  for key, value in placed.items():
    old = flat[key]
    flat[key] = jax.device_put(np.asarray(value, dtype=old.dtype), flat_sh[key])
    if isinstance(old, jax.Array):
      old.delete()  # freed now, not when the caller's tree goes
  return traverse_util.unflatten_dict(flat, sep="/")
