"""Device mesh, logical axis rules and parameter shardings: the one place that knows both.

Models name array dimensions with logical axis names only (below); the rules in the
config map them to the mesh axes `data`, `fsdp` and `tensor`. Nothing else in vlpre
mentions a mesh axis, except the batch sharding helpers here.

Logical axis names (summarised in docs/adding_a_method.md's glossary). Each name means
one thing in every file, so one rule shards every weight that has that dimension:
  weights:
    embed           model width D
    mlp             MLP hidden width F
    heads           attention heads H, an axis of its own ([D, H, K] kernels: the ViT,
                    the text tower, the MAP head)
    kv              per-head dim K, next to `heads` in those kernels
    heads_fused     H x K fused in one axis, as in Hugging Face layouts (the LLM's
                    q_proj / o_proj, BERT's attention): sharding it splits whole heads
                    only when its mesh axis divides H
    kv_heads_fused  G x K fused, the key/value projections under grouped-query attention
                    (the LLM's k_proj / v_proj, extra image K/V); smaller than
                    heads_fused, so rules can leave it replicated
    vocab           token-table rows
    classes         classifier outputs
    layers          the stacked axis of scanned blocks
    conv_in / conv_out  convolution channels
    norm            scales and biases of norms
  activations:  batch, length (positions), act_embed, act_mlp, act_heads (heads H of
                [B, N, H, K] attention outputs)
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every data-parallel axis: plain data parallelism and fsdp.
BATCH_AXES = ("data", "fsdp")

# Default logical → mesh rules (MaxText style). A config may override any of them.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("heads_fused", "tensor"),
    ("kv_heads_fused", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh from `(name, size)` pairs; one size may be -1 to fill the rest."""
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  unknown = set(names) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; vlpre's axes are {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or len(devices) % known:
    raise ValueError(
        f"mesh {dict(axes)} does not divide the {len(devices)} available devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh {dict(zip(names, sizes))} uses {math.prod(sizes)} devices but "
        f"{len(devices)} are available; set one axis to -1 to fill the rest")
  # Every named axis exists in the mesh (size 1 if unused) so rules never dangle.
  for name in MESH_AXES:
    if name not in names:
      names.append(name)
      sizes.append(1)
  device_grid = np.asarray(devices).reshape(sizes)
  try:  # Topology-aware placement where the platform supports it (TPU, GPU).
    device_grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # pylint: disable=broad-except
    pass
  return Mesh(device_grid, tuple(names))


def logical_rules(config_rules: Sequence[Sequence[Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """The default rules with the config's overrides applied (same name → replaced)."""
  overrides = {name: _as_axes(axes) for name, axes in (config_rules or ())}
  rules = [(name, overrides.pop(name, axes)) for name, axes in DEFAULT_RULES]
  rules.extend(overrides.items())
  return tuple(rules)


@contextlib.contextmanager
def active(mesh: Mesh, rules):
  """The context every step, evaluator and store is traced in: `mesh` set as jax's mesh
  and the logical `rules` on. Both are needed for nn.with_logical_constraint to constrain
  anything: flax finds the mesh through jax.set_mesh only. Under the older `with mesh:`
  every logical constraint is a silent no-op, and XLA is free to split activations on the
  width and all-reduce them in every layer instead of gathering weights (FSDP): a step
  with a frozen 7B LLM moved ~500 GB a chip that way (docs/scaling.md)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _as_axes(axes):
  if isinstance(axes, list):
    return tuple(axes)
  return axes


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a tree whose leaves may be boxed with logical names (nn.Partitioned).

  Unboxed leaves (no logical names) are replicated; `fsdp_fallback` handles those where
  they are large (see `fallback_shardings`).
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def logical_names_to_shardings(names_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a tree of logical-name tuples (e.g. a frozen LLM's annotations)."""
  def to_sharding(names):
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))
  return jax.tree.map(to_sharding, names_tree, is_leaf=lambda x: isinstance(x, tuple))


def fsdp_fallback(abstract_tree: Any, mesh: Mesh, min_size: int = 2**18) -> Any:
  """Shards every large leaf over `fsdp` along its largest divisible dimension.

  For weights that carry no logical names (e.g. a checkpoint loaded as a plain tree).
  """
  fsdp = mesh.shape["fsdp"]

  def pick(leaf):
    shape = getattr(leaf, "shape", ())
    if fsdp == 1 or math.prod(shape) < min_size:
      return NamedSharding(mesh, P())
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % fsdp == 0:
        spec = [None] * len(shape)
        spec[dim] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(pick, abstract_tree)


def assert_sharded(tree: Any, shardings: Any, *, axis: str = "fsdp", min_size: int = 2**18) -> None:
  """Fails if a parameter of `min_size` or more elements is not split over `axis`.

  Guards against a rule typo silently replicating a large model on every device.
  """
  problems = []
  for (path, leaf), sharding in zip(
      jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings)):
    if math.prod(getattr(leaf, "shape", ())) < min_size:
      continue
    if sharding.mesh.shape[axis] == 1:
      continue
    used = {a for part in sharding.spec if part for a in (part if isinstance(part, tuple) else (part,))}
    if axis not in used:
      problems.append(f"{jax.tree_util.keystr(path)} {leaf.shape} spec={sharding.spec}")
  if problems:
    raise ValueError(f"parameters not sharded over '{axis}':\n  " + "\n  ".join(problems))


def path_str(path) -> str:
  """'img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel' for a pytree key path."""
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    parts.append(str(name))
  return "/".join(parts)


def tree_paths(tree: Any) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def matches_any(patterns: Sequence[str], name: str) -> bool:
  return any(re.fullmatch(p, name) for p in patterns)


def block_indices(names: Sequence[str], shape: tuple[int, ...]) -> list[int] | int | None:
  """Block indices a parameter holds: a list for stacked groups (leading axis), an int for
  a per-block subtree, None outside the blocks. vlpre's layouts: the decoder's `layers`,
  `layers_4to7`, `layers_3`; the ViT / text tower's scanned `blocks` and `block_3`."""
  for name in names:
    if name in ("layers", "blocks"):
      return list(range(shape[0]))
    if match := re.fullmatch(r"layers_(\d+)to(\d+)", name):
      return list(range(int(match.group(1)), int(match.group(2)) + 1))
    if match := re.fullmatch(r"(?:layers|block)_(\d+)", name):
      return int(match.group(1))
  return None
