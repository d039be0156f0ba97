"""Mesh construction, logical rules, and that large parameters really are sharded."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from vlpre import sharding
from vlpre.methods import build_model


def test_mesh_fill_and_errors():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 4)])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh([("data", 3), ("fsdp", -1)])
  with pytest.raises(ValueError, match="uses 4 devices"):
    sharding.make_mesh([("data", 2), ("fsdp", 2)])
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh([("model", -1)])


def test_rules_override():
  rules = dict(sharding.logical_rules([("embed", None), ("new", "tensor")]))
  assert rules["embed"] is None and rules["new"] == "tensor" and rules["mlp"] == "tensor"


def _abstract_clip(width=256):
  model = build_model("two_tower", dict(
      image=dict(width=width, depth=2, mlp_dim=4 * width, num_heads=4, patch_size=8),
      text=dict(width=width, depth=2, mlp_dim=4 * width, num_heads=4, vocab_size=1000, max_len=16),
      embed_dim=128))
  batch = {"image": jnp.zeros((8, 32, 32, 3)), "text": jnp.ones((8, 16), jnp.int32)}
  return jax.eval_shape(lambda r: model.init(r, batch), jax.random.key(0))


def test_golden_shardings_under_fsdp_and_tensor():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  shardings = sharding.logical_shardings(_abstract_clip(), mesh, sharding.logical_rules())
  p = nn.meta.unbox(shardings)["params"]
  assert p["img"]["encoder"]["blocks"]["mlp"]["Dense_0"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert p["img"]["encoder"]["blocks"]["attn"]["query"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert p["txt"]["token_embed"]["embedding"].spec == P("tensor", "fsdp")
  assert p["img"]["encoder"]["blocks"]["ln_attn"]["scale"].spec == P(None, None)


def test_assert_sharded_catches_replicated_large_weights():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  abstract = nn.meta.unbox(_abstract_clip())
  good = nn.meta.unbox(sharding.logical_shardings(_abstract_clip(), mesh, sharding.logical_rules()))
  sharding.assert_sharded(abstract, good, min_size=2**16)
  replicated = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  with pytest.raises(ValueError, match="not sharded over 'fsdp'"):
    sharding.assert_sharded(abstract, replicated, min_size=2**16)


def test_fsdp_fallback_picks_a_divisible_dimension():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  tree = {"w": jax.ShapeDtypeStruct((6, 1024), jnp.float32), "b": jax.ShapeDtypeStruct((6,), jnp.float32)}
  sh = sharding.fsdp_fallback(tree, mesh, min_size=1024)
  assert sh["w"].spec == P(None, "fsdp") and sh["b"].spec == P()
