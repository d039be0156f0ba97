"""Logical axis names for BERT text-encoder weights (transformers' Flax BERT names none).

vlpre's own decoder (vlpre.llm) annotates its weights inside the module; only checkpoints
run on a third-party module need these rules.

The trainer maps these names to mesh axes with its own rules (e.g. embed -> fsdp,
mlp/heads_fused -> tensor); this file only says what each weight dimension *is*, in
vlpre.sharding's vocabulary:
  vocab        token-embedding rows
  embed        model width D
  mlp          MLP hidden width F
  heads_fused  query/attention-output width (heads x head_dim, fused as in HF checkpoints)
  norm         RMSNorm/LayerNorm parameters
  None         a dimension not worth sharding (biases, position tables' row axis)
"""
from __future__ import annotations

import re
from typing import Any

from flax import core as flax_core
from flax import traverse_util

LogicalAxes = tuple[str | None, ...]

# First match wins; patterns are searched in the "/"-joined parameter path (transformers'
# Flax BERT names).
_RULES: tuple[tuple[str, LogicalAxes], ...] = (
    (r"word_embeddings/embedding$", ("vocab", "embed")),
    (r"(position_embeddings|token_type_embeddings)/embedding$", (None, "embed")),
    (r"norm[^/]*/(scale|bias)$", ("norm",)),
    (r"attention/self/(query|key|value)/kernel$", ("embed", "heads_fused")),
    (r"attention/output/dense/kernel$", ("heads_fused", "embed")),
    (r"intermediate/dense/kernel$", ("embed", "mlp")),
    (r"output/dense/kernel$", ("mlp", "embed")),
    (r"/bias$", (None,)),
)


def logical_axes_for(path: str, ndim: int) -> LogicalAxes:
  """Logical axes of the parameter at `path` ("a/b/kernel")."""
  for pattern, axes in _RULES:
    if re.search(pattern, path, flags=re.IGNORECASE):
      if len(axes) != ndim:
        raise ValueError(f"{path}: rule {pattern!r} gives {axes} for a rank-{ndim} array")
      return axes
  raise ValueError(f"no logical-axis rule for text-encoder parameter {path!r}")


def param_logical_axes(params: Any) -> Any:
  """A pytree like `params` whose leaves are tuples of logical axis names.

  Args:
    params: a text encoder's parameter tree (arrays or ShapeDtypeStructs).

  Returns:
    The same nesting with tuples as leaves. Note tuples are pytree nodes for jax.tree
    functions; map over both trees with `is_leaf=lambda x: isinstance(x, tuple)`.
  """
  flat = traverse_util.flatten_dict(flax_core.unfreeze(params))
  axes = {path: logical_axes_for("/".join(map(str, path)), len(leaf.shape))
          for path, leaf in flat.items()}
  return traverse_util.unflatten_dict(axes)
