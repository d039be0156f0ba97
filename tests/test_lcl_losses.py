"""LCL's losses against naive numpy loops, on one device and sharded over 8 unevenly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlpre import losses, methods, sharding
from vlpre.methods.lcl import losses as lcl_losses

B, M, E, L, V = 16, 3, 8, 10, 12


def _cosine(a, b):
  return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))


def _logsumexp(x):
  x = np.asarray(x, np.float64)
  return x.max() + np.log(np.sum(np.exp(x - x.max())))


def naive_contrastive(outputs):
  """(loss, accuracy, num_valid): per valid slot, CE of its row (<soi> against every valid
  image) and of its column (its image against every valid <soi>), averaged."""
  soi = outputs["soi_embedding_BxMxE"].reshape(-1, E).astype(np.float64)
  image = outputs["image_latent_BxMxE"].reshape(-1, E).astype(np.float64)
  scale = float(outputs["logit_scale"])
  valid = [i for i, v in enumerate(outputs["image_valid_BxM"].reshape(-1)) if v]
  total, correct = 0.0, 0
  for own, i in enumerate(valid):
    row = [scale * _cosine(soi[i], image[j]) for j in valid]
    column = [scale * _cosine(soi[j], image[i]) for j in valid]
    total += 0.5 * (_logsumexp(row) - row[own]) + 0.5 * (_logsumexp(column) - column[own])
    correct += int(np.argmax(row) == own)
  return total / max(len(valid), 1), correct / max(len(valid), 1), len(valid)


def naive_generation(logits, tokens, target_mask):
  total, count = 0.0, 0
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1] - 1):
      if target_mask[b, t]:
        total += _logsumexp(logits[b, t]) - logits[b, t, tokens[b, t + 1]]
        count += 1
  return total / count


def contrastive_outputs(valid_BxM, seed=0):
  rng = np.random.default_rng(seed)
  return {"soi_embedding_BxMxE": rng.normal(size=(B, M, E)).astype(np.float32),
          "image_latent_BxMxE": rng.normal(size=(B, M, E)).astype(np.float32),
          "image_valid_BxM": np.asarray(valid_BxM, bool), "logit_scale": np.float32(7.5)}


def _check_contrastive(outputs, value, metrics):
  loss, accuracy, num_valid = naive_contrastive(outputs)
  np.testing.assert_allclose(float(value), loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, atol=1e-6)
  assert float(metrics["num_valid_images"]) == num_valid


def test_contrastive_matches_naive_reference_with_invalid_slots():
  valid = np.random.default_rng(1).random((B, M)) < 0.6
  outputs = contrastive_outputs(valid)
  _check_contrastive(outputs, *lcl_losses.lcl_contrastive(outputs, {}))


def test_invalid_slots_neither_count_nor_receive_gradient():
  valid = np.random.default_rng(2).random((B, M)) < 0.5
  outputs = contrastive_outputs(valid)
  garbage = {**outputs}
  for key in ("soi_embedding_BxMxE", "image_latent_BxMxE"):
    garbage[key] = np.where(valid[..., None], outputs[key], 1e4 * outputs[key][::-1])
  np.testing.assert_allclose(float(lcl_losses.lcl_contrastive(garbage, {})[0]),
                             float(lcl_losses.lcl_contrastive(outputs, {})[0]), rtol=1e-6)
  grads = jax.grad(lambda soi, image: lcl_losses.lcl_contrastive(
      {**outputs, "soi_embedding_BxMxE": soi, "image_latent_BxMxE": image}, {})[0], (0, 1))(
          outputs["soi_embedding_BxMxE"], outputs["image_latent_BxMxE"])
  for grad in grads:
    assert np.all(np.asarray(grad)[~valid] == 0) and np.any(np.asarray(grad)[valid] != 0)


@pytest.mark.parametrize("num_valid", [1, 0])
def test_all_but_one_and_all_invalid(num_valid):
  valid = np.zeros((B, M), bool)
  valid[5, 1] = num_valid == 1
  outputs = contrastive_outputs(valid)
  value, metrics = lcl_losses.lcl_contrastive(outputs, {})
  _check_contrastive(outputs, value, metrics)  # one image: its own only candidate, loss 0
  assert float(value) == pytest.approx(0.0, abs=1e-6)
  grad = jax.grad(lambda soi: lcl_losses.lcl_contrastive({**outputs, "soi_embedding_BxMxE": soi}, {})[0])(
      outputs["soi_embedding_BxMxE"])
  assert np.all(np.isfinite(np.asarray(grad)))


def _sharded_over_rows(mesh, outputs):
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  return {k: jax.device_put(v, rows if np.ndim(v) else NamedSharding(mesh, P()))
          for k, v in outputs.items()}


def test_contrastive_sharded_with_uneven_valid_counts_sees_the_global_batch():
  """8 devices × 2 rows × 3 slots; valid images per device 0, 6, 1, 5, 2, 4, 3, 6."""
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  rng = np.random.default_rng(3)
  valid_slots = np.zeros((8, 2 * M), bool)
  for device, count in enumerate([0, 6, 1, 5, 2, 4, 3, 6]):
    valid_slots[device, rng.permutation(2 * M)[:count]] = True
  outputs = contrastive_outputs(valid_slots.reshape(B, M), seed=3)
  placed = _sharded_over_rows(mesh, outputs)
  per_device = sorted(int(s.data.sum()) for s in placed["image_valid_BxM"].addressable_shards)
  assert per_device == [0, 1, 2, 3, 4, 5, 6, 6]
  value, metrics = jax.jit(lambda o: lcl_losses.lcl_contrastive(o, {}))(placed)
  _check_contrastive(outputs, value, metrics)
  np.testing.assert_allclose(float(value), float(lcl_losses.lcl_contrastive(outputs, {})[0]), rtol=1e-6)
  # Negatives from one device only would give another number: the check has teeth.
  local = [naive_contrastive({k: (v[2 * d:2 * d + 2] if np.ndim(v) else v)
                              for k, v in outputs.items()}) for d in range(8)]
  local_mean = sum(loss * n for loss, _, n in local) / sum(n for _, _, n in local)
  assert abs(local_mean - naive_contrastive(outputs)[0]) > 1e-2


def generation_case(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, L, V)).astype(np.float32)
  tokens = rng.integers(V, size=(B, L)).astype(np.int32)
  target_mask = (rng.random((B, L)) < 0.5).astype(np.int32)
  target_mask[:3] = 0  # rows with no text target at all, e.g. a lone image
  return {"logits_BxLxV": logits}, {"tokens": tokens, "target_mask": target_mask}


def test_generation_matches_naive_reference():
  outputs, batch = generation_case()
  value, metrics = lcl_losses.lcl_generation(outputs, batch)
  np.testing.assert_allclose(float(value), naive_generation(
      outputs["logits_BxLxV"], batch["tokens"], batch["target_mask"]), rtol=1e-5)
  assert float(metrics["num_tokens"]) == batch["target_mask"][:, :-1].sum()


def test_generation_sharded_equals_unsharded():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  outputs, batch = generation_case(seed=1)
  value = jax.jit(lcl_losses.lcl_generation)(_sharded_over_rows(mesh, outputs),
                                      _sharded_over_rows(mesh, batch))[0]
  np.testing.assert_allclose(float(value), naive_generation(
      outputs["logits_BxLxV"], batch["tokens"], batch["target_mask"]), rtol=1e-5)


def test_the_method_brings_them_weighted_like_every_loss():
  outputs, batch = generation_case()
  outputs.update(contrastive_outputs(np.random.default_rng(4).random((B, M)) < 0.5))
  total, metrics = losses.build_loss({"lcl_contrastive": 0.1, "lcl_generation": 1.0},
                                     methods.get("lcl").losses)(outputs, batch)
  expected = 0.1 * naive_contrastive(outputs)[0] + naive_generation(
      outputs["logits_BxLxV"], batch["tokens"], batch["target_mask"])
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  assert {"lcl_contrastive/accuracy", "lcl_contrastive/num_valid_images",
          "lcl_generation/num_tokens"} <= set(metrics)
  assert jnp.isfinite(metrics["lcl_contrastive/loss"])
