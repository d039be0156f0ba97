"""Speed options of the transformer towers compute the same function as the references:
attention implementations against a naive numpy attention, and the layer loop scanned
(rolled or unrolled) or one module per block, on CLIP's loss and every gradient."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpre import losses
from vlpre.nn import layers
from vlpre.methods.two_tower import model as two_tower

IMPLEMENTATIONS = ("dot_product_attention", "einsum")


def _naive_attention(q, k, v, mask):
  """float64 softmax(q kᵀ / √K) v per batch row and head, masked keys excluded."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, t, heads, dim = q.shape
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      logits = q[b, :, h] @ k[b, :, h].T / np.sqrt(dim)
      logits = np.where(mask[b], logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h]
  return out


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_a_naive_reference(implementation, causal, padded):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 7, 3, 8)).astype(np.float32) for _ in range(3))
  keep_BxS = np.ones((2, 7), bool)
  if padded:
    keep_BxS[0, 5:] = False
  mask_BxTxS = np.broadcast_to(keep_BxS[:, None, :], (2, 7, 7)).copy()
  if causal:
    mask_BxTxS &= np.tril(np.ones((7, 7), bool))
  out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                         jnp.asarray(keep_BxS[:, None, None, :]) if padded else None,
                         causal=causal, implementation=implementation)
  np.testing.assert_allclose(np.asarray(out), _naive_attention(q, k, v, mask_BxTxS),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_implementations_have_the_same_gradients(causal):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 4)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(np.arange(6)[None, None, None, :] < np.array([6, 4])[:, None, None, None])
  w = jnp.asarray(rng.normal(size=(2, 6, 2, 4)), jnp.float32)

  def grads(implementation):
    f = lambda q, k, v: (w * layers.attention(q, k, v, mask, causal=causal,
                                              implementation=implementation)).sum()
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  for a, b in zip(grads("dot_product_attention"), grads("einsum")):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_auto_resolves_per_backend_and_bad_values_are_errors():
  assert jax.default_backend() == "cpu"
  assert layers.resolve_attention("auto") == "einsum"
  assert layers.resolve_unroll(None, 12) == 12
  assert layers.resolve_unroll(False, 12) == 1 and layers.resolve_unroll(3, 12) == 3
  with pytest.raises(ValueError, match="attention"):
    layers.resolve_attention("flash")
  with pytest.raises(ValueError, match="unroll"):
    layers.resolve_unroll(13, 12)


DEPTH = 3


def _clip(scan=True, unroll=None, attention="auto"):
  tower = dict(depth=DEPTH, num_heads=2, scan=scan, unroll=unroll, attention=attention)
  return two_tower.Model(
      image=dict(width=16, mlp_dim=32, patch_size=4, pool="cls", **tower),
      text=dict(vocab_size=50, max_len=8, width=16, mlp_dim=32, **tower), embed_dim=8)


def _batch():
  rng = np.random.default_rng(2)
  mask = (np.arange(8)[None] < np.array([8, 5, 3, 6])[:, None]).astype(np.int32)
  return {"image": jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32),
          "text": jnp.asarray(rng.integers(1, 50, size=(4, 8)) * mask, jnp.int32),
          "text_mask": jnp.asarray(mask)}


def _unstack(params):
  """The scanned towers' stacked `blocks` as the unrolled towers' block_i subtrees."""
  params = jax.tree.map(lambda x: x, params)
  for tower in ("img", "txt"):
    encoder = dict(params[tower]["encoder"])
    stacked = encoder.pop("blocks")
    encoder.update({f"block_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                    for i in range(DEPTH)})
    params[tower] = {**params[tower], "encoder": encoder}
  return params


def _loss_and_grads(model, params, batch):
  loss_fn = losses.build_loss({"clip": 1.0})
  f = lambda p: loss_fn(model.apply({"params": p}, batch, train=True), batch)[0]
  return jax.jit(jax.value_and_grad(f))(params)


# (attention, scan, unroll) against scanned, rolled, jax.nn.dot_product_attention.
FORMS = (("einsum", True, True), ("dot_product_attention", True, 2), ("einsum", False, None))


def test_layer_loop_forms_and_attention_implementations_give_the_same_loss_and_gradients():
  batch = _batch()
  reference = _clip(scan=True, unroll=1, attention="dot_product_attention")
  params = nn.meta.unbox(reference.init(jax.random.key(0), batch))["params"]
  ref_loss, ref_grads = _loss_and_grads(reference, params, batch)
  for attention, scan, unroll in FORMS:
    model = _clip(scan=scan, unroll=unroll, attention=attention)
    if scan:  # stacked parameters do not depend on `unroll` or the attention
      shapes = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
      assert jax.tree.structure(nn.meta.unbox(shapes)) == jax.tree.structure(params)
    loss, grads = _loss_and_grads(model, params if scan else _unstack(params), batch)
    ref = ref_grads if scan else _unstack(ref_grads)
    label = f"{attention}, scan={scan}, unroll={unroll}"
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, err_msg=label)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-5, err_msg=label), grads, ref)
