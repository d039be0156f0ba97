"""Speed options of the transformer towers compute the same function as the references:
the layer loop scanned (rolled or unrolled) or one module per block, and the attention
implementations, on CLIP's loss and every gradient. (The attention op itself against a
naive numpy attention: tests/test_core.py.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpre import losses
from vlpre.methods.two_tower import model as two_tower

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


@pytest.mark.slow  # over 20 s on 2 cores
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
