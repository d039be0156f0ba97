"""Losses against naive numpy references, on one device and sharded over 8."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bench import loss_memory
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


_MESHES = {"data2_fsdp4": [("data", 2), ("fsdp", 4)], "data8": [("data", 8)],
           "fsdp8": [("fsdp", 8)], "one_device": [("data", 1)]}


@pytest.mark.parametrize("mesh_axes", sorted(_MESHES))
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_local_loss_equals_the_global_one_with_its_gradients(name, mesh_axes):
  """loss_impl="local": each device's rows against the gathered (CLIP) or ring-passed
  (SigLIP) texts give the global loss, metrics and gradients with respect to both
  embeddings, the logit scale and the bias, to 1e-6; and the naive reference."""
  size = int(np.prod([s for _, s in _MESHES[mesh_axes]]))
  mesh = sharding.make_mesh(_MESHES[mesh_axes], jax.devices()[:size])
  out = _outputs(n=32, e=16)
  row = NamedSharding(mesh, P(sharding.BATCH_AXES))
  placed = {k: jax.device_put(v, row if np.ndim(v) else NamedSharding(mesh, P()))
            for k, v in out.items()}
  local = losses.build_loss({name: 1.0}, impl="local", mesh=mesh)
  value_and_grad = lambda fn: jax.jit(jax.value_and_grad(lambda o: fn(o, {}), has_aux=True))(placed)
  (value, metrics), grads = value_and_grad(local)
  (global_value, global_metrics), global_grads = value_and_grad(losses.build_loss({name: 1.0}))
  np.testing.assert_allclose(float(value), CASES[name](out), rtol=1e-5)
  np.testing.assert_allclose(float(value), float(global_value), rtol=1e-6)
  assert metrics.keys() == global_metrics.keys()
  for key in metrics:
    np.testing.assert_allclose(metrics[key], global_metrics[key], rtol=1e-6, atol=1e-6)
  for key in ("zimg", "ztxt", "logit_scale", "logit_bias"):
    np.testing.assert_allclose(grads[key], global_grads[key], rtol=1e-6, atol=1e-6, err_msg=key)
  assert abs(float(grads["logit_scale"])) > 1e-3
  assert name == "clip" or abs(float(grads["logit_bias"])) > 1e-3


def test_local_losses_need_the_mesh_and_a_known_impl():
  with pytest.raises(ValueError, match="needs the mesh"):
    losses.build_loss({"clip": 1.0}, impl="local")
  with pytest.raises(ValueError, match="loss_impl 'ring'"):
    losses.build_loss({"clip": 1.0}, impl="ring")


def test_local_loss_memory_falls_with_the_device_count():
  """The compiled per-device temporaries of loss + gradient (the B×B term's) on 1, 2, 4
  and 8 devices: each device count needs less than the one before (bench/loss_memory.py)."""
  for name in ("clip", "siglip"):
    temp = [loss_memory.temp_bytes(name, "local", d, 512, 16) for d in loss_memory.DEVICE_COUNTS]
    assert all(a > b for a, b in zip(temp, temp[1:])), (name, temp)
    assert temp[-1] < temp[0] / 4, (name, temp)  # about 1/D of it, not a constant offset


@pytest.mark.slow
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
