"""Losses against naive numpy references, on one device and sharded over 8."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlpre import losses, sharding


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def naive_clip(zimg, ztxt, scale):
  sim = scale * _normalize(zimg) @ _normalize(ztxt).T
  n = len(sim)
  total = 0.0
  for i in range(n):  # row i: image i against every text; column i: text i against every image
    total += -(sim[i, i] - np.log(np.sum(np.exp(sim[i, :])))) / (2 * n)
    total += -(sim[i, i] - np.log(np.sum(np.exp(sim[:, i])))) / (2 * n)
  return total


def naive_siglip(zimg, ztxt, t, b):
  n = len(zimg)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      logit = t * np.dot(_normalize(zimg[i]), _normalize(ztxt[j])) + b
      total += -np.log(1.0 / (1.0 + np.exp(-z * logit)))
  return total / n


def naive_cosine(zimg, ztxt):
  return np.mean(1 - np.sum(_normalize(zimg) * _normalize(ztxt), -1))


def _outputs(n=16, e=32, seed=0, scale=14.3, bias=-3.0):
  rng = np.random.default_rng(seed)
  return {"zimg": rng.normal(size=(n, e)).astype(np.float32),
          "ztxt": rng.normal(size=(n, e)).astype(np.float32),
          "logit_scale": np.float32(scale), "logit_bias": np.float32(bias)}


CASES = {
    "clip": lambda o: naive_clip(o["zimg"], o["ztxt"], o["logit_scale"]),
    "siglip": lambda o: naive_siglip(o["zimg"], o["ztxt"], o["logit_scale"], o["logit_bias"]),
    "cosine": lambda o: naive_cosine(o["zimg"], o["ztxt"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_matches_naive_reference(name):
  out = _outputs()
  value, _ = losses.LOSSES[name](out, {})
  np.testing.assert_allclose(float(value), CASES[name](out), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_sharded_over_8_devices_sees_the_global_batch(name):
  """Each device holds 2 of 16 samples; negatives must still come from all 16."""
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  out = _outputs(n=16)
  row = NamedSharding(mesh, P(sharding.BATCH_AXES))
  placed = {k: jax.device_put(v, row if np.ndim(v) else NamedSharding(mesh, P()))
            for k, v in out.items()}
  assert placed["zimg"].addressable_shards[0].data.shape[0] == 2
  value, _ = jax.jit(lambda o: losses.LOSSES[name](o, {}))(placed)
  np.testing.assert_allclose(float(value), CASES[name](out), rtol=1e-5)
  # Per-device losses (only local negatives) would differ: the reference is not trivially met.
  if name != "cosine":
    local = np.mean([CASES[name]({k: (v[i:i + 2] if np.ndim(v) else v) for k, v in out.items()})
                     for i in range(0, 16, 2)])
    assert abs(local - CASES[name](out)) > 1e-2


def test_clip_gradient_matches_finite_difference():
  out = _outputs(n=6, e=8)
  f = lambda zimg: losses.clip_loss({**out, "zimg": zimg}, {})[0]
  grad = jax.grad(f)(jnp.asarray(out["zimg"]))
  eps = 1e-3
  probe = np.zeros_like(out["zimg"])
  probe[2, 3] = eps
  numeric = (naive_clip(out["zimg"] + probe, out["ztxt"], out["logit_scale"]) -
             naive_clip(out["zimg"] - probe, out["ztxt"], out["logit_scale"])) / (2 * eps)
  np.testing.assert_allclose(float(grad[2, 3]), numeric, rtol=1e-2, atol=1e-4)


def test_build_loss_weights_and_prefixes():
  out = _outputs()
  total, metrics = losses.build_loss({"clip": 0.5, "cosine": 2.0})(out, {})
  expected = 0.5 * naive_clip(out["zimg"], out["ztxt"], out["logit_scale"]) + 2.0 * naive_cosine(
      out["zimg"], out["ztxt"])
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  assert "clip/loss" in metrics and "cosine/cosine" in metrics


def test_unknown_loss_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown losses"):
    losses.build_loss({"clipp": 1.0})


def test_l2_normalize_is_x_over_max_norm_eps():
  """torch.nn.functional.normalize's definition, including vectors shorter than eps."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 8)).astype(np.float32)
  x[1] *= 1e-14  # norm below eps: divided by eps, not blown up to unit length
  x[2] = 0.0
  eps = 1e-12
  expected = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(x, eps=eps)), expected, rtol=1e-5,
                             atol=1e-30)
  np.testing.assert_allclose(np.asarray(losses.l2_normalize(x.T, axis=0, eps=eps)), expected.T,
                             rtol=1e-5, atol=1e-30)
  assert losses.l2_normalize(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_l2_normalize_gradient_is_finite_at_zero():
  grad = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x)))(jnp.zeros((2, 3)))
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.integration
def test_every_shared_family_is_registered_when_the_package_is_imported():
  """No shared loss depends on some method having been imported first."""
  code = ("import sys; from vlpre import losses; "
          "assert {'clip', 'siglip', 'cosine', 'softmax_ce', 'text_infonce', "
          "'text_infonce_oneway', 'text_byol'} <= set(losses.LOSSES), sorted(losses.LOSSES); "
          "assert not any(m.startswith('vlpre.methods') for m in sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_a_name_in_two_families_is_an_error():
  with pytest.raises(ValueError, match="defined twice"):
    losses._merge((("first", {"clip": losses.clip_loss}),  # pylint: disable=protected-access
                   ("second", {"clip": losses.cosine_loss})))
  with pytest.raises(ValueError, match="already registered"):
    losses.register_loss("clip", losses.cosine_loss)
