"""ViT.encode's multi-level features and MapHead's per-patch latents, on tiny dimensions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpre.nn import layers
from vlpre.nn.vit import ViT

DEPTH, WIDTH, HEADS = 3, 16, 2


def _vit(pool, scan=True, remat=False):
  return ViT(width=WIDTH, depth=DEPTH, mlp_dim=32, num_heads=HEADS, patch_size=4, pool=pool,
             scan=scan, remat=remat)


def _image(batch=2, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def _init(model, x):
  return nn.meta.unbox(model.init(jax.random.key(0), x))


def _encode(model, variables, image):
  return model.apply(variables, image, method=model.encode)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["cls", "mean", "map", "none"])
def test_last_block_after_the_final_layernorm_is_the_tokens(pool):
  model, image = _vit(pool), _image()
  variables = _init(model, image)
  out = _encode(model, variables, image)
  num_patches = (16 // 4) ** 2
  assert out["blocks"].shape == (DEPTH, 2, num_patches, WIDTH)
  assert out["tokens"].shape == out["patch_tokens"].shape == (2, num_patches, WIDTH)
  assert ("patch_latents" in out) == (pool == "map")
  ln_final = layers.layer_norm(jnp.float32)
  normed = ln_final.apply({"params": variables["params"]["encoder"]["ln_final"]}, out["blocks"][-1])
  np.testing.assert_allclose(np.asarray(normed), np.asarray(out["tokens"]), rtol=1e-5, atol=1e-5)
  # __call__ is encode's first two entries.
  pooled, tokens = model.apply(variables, image)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(out["tokens"]))
  if pool == "none":
    assert pooled is None and out["pooled"] is None
  else:
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(out["pooled"]))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_and_unrolled_encoders_give_the_same_blocks(remat):
  image = _image()
  scanned = _vit("map", scan=True, remat=remat)
  variables = _init(scanned, image)
  # The unrolled encoder's block_i is slice i of the scanned parameters' `layers` axis.
  params = dict(variables["params"])
  stacked = params["encoder"]["blocks"]
  params["encoder"] = {"ln_final": params["encoder"]["ln_final"],
                       **{f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                          for i in range(DEPTH)}}
  unrolled = _vit("map", scan=False, remat=remat)
  a = _encode(scanned, variables, image)
  b = _encode(unrolled, {"params": params}, image)
  for key in ("blocks", "tokens", "patch_tokens", "pooled", "patch_latents"):
    np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-5, atol=1e-5,
                               err_msg=key)
  # Each block's output feeds the next: they are not all the same tensor.
  assert not np.allclose(np.asarray(a["blocks"][0]), np.asarray(a["blocks"][1]))


def _naive_latents(x_BxNxD, params):
  """out(value(x_n)) for every token, one token at a time."""
  wv, bv = np.asarray(params["value"]["kernel"]), np.asarray(params["value"]["bias"])  # DxHxK, HxK
  wo, bo = np.asarray(params["out"]["kernel"]), np.asarray(params["out"]["bias"])      # HxKxD, D
  batch, num_tokens, width = x_BxNxD.shape
  latents = np.zeros((batch, num_tokens, width), np.float64)
  for b in range(batch):
    for n in range(num_tokens):
      v_HxK = np.einsum("d,dhk->hk", x_BxNxD[b, n], wv) + bv
      latents[b, n] = np.einsum("hk,hkd->d", v_HxK, wo) + bo
  return latents


def test_map_head_patch_latents_match_a_naive_reference():
  x_BxNxD = np.random.default_rng(1).normal(size=(2, 5, WIDTH)).astype(np.float32)
  head = layers.MapHead(HEADS, 32)
  variables = _init(head, x_BxNxD)
  pooled_BxD, latents_BxNxD = head.apply(variables, x_BxNxD, return_patch_latents=True)
  np.testing.assert_allclose(np.asarray(latents_BxNxD), _naive_latents(x_BxNxD, variables["params"]),
                             rtol=1e-5, atol=1e-5)
  # Asking for the latents changes neither the parameters nor the pooled output.
  np.testing.assert_array_equal(np.asarray(pooled_BxD), np.asarray(head.apply(variables, x_BxNxD)))


def test_vit_exposes_the_map_heads_latents_of_its_tokens():
  model, image = _vit("map"), _image()
  variables = _init(model, image)
  out = _encode(model, variables, image)
  expected = _naive_latents(np.asarray(out["tokens"]), variables["params"]["map_head"])
  np.testing.assert_allclose(np.asarray(out["patch_latents"]), expected, rtol=1e-4, atol=1e-5)


def test_with_one_token_the_pooled_pre_mlp_output_is_its_latent():
  """All attention weight on one token (N=1): the pool before its MLP residual is that latent."""
  x_Bx1xD = np.random.default_rng(2).normal(size=(3, 1, WIDTH)).astype(np.float32)
  head = layers.MapHead(HEADS, 32)
  variables = _init(head, x_Bx1xD)
  (_, latents_Bx1xD), state = head.apply(
      variables, x_Bx1xD, return_patch_latents=True,
      capture_intermediates=lambda module, method: module.name == "out")
  # `out` runs first on the attention output (the pool), then on the values (the latents).
  pool_Bx1xD, latents_again = state["intermediates"]["out"]["__call__"]
  np.testing.assert_array_equal(np.asarray(latents_again), np.asarray(latents_Bx1xD))
  np.testing.assert_allclose(np.asarray(pool_Bx1xD), np.asarray(latents_Bx1xD), rtol=1e-5,
                             atol=1e-6)
