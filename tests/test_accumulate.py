"""Gradient accumulation (vlpre/accumulate.py): an accumulated step is the same update as
the unaccumulated one, for batch-coupled (contrastive) and per-example losses, with
frozen parameters and BatchNorm state; --check and the stages see `accum_steps`."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from tests import helpers
from vlpre import accumulate, check, init_params, losses, methods, optim, sharding, stages
from vlpre import train_state


def _assert_trees_close(actual, desired, tolerance=1e-5):
  """Each leaf within fp32 round-off of summing in another order (chunked matmuls add the
  same terms in another order): `tolerance` of the leaf's largest magnitude, or of a
  thousandth of the whole tree's for a leaf whose values are all round-off themselves."""
  floor = 1e-3 * max(float(np.max(np.abs(np.asarray(y)))) for y in jax.tree.leaves(desired))

  def close(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=0, atol=tolerance * max(np.max(np.abs(y)), floor))
  jax.tree.map(close, actual, desired)


def _max_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_split_and_merge_are_inverse_and_chunks_stride_over_each_device_share():
  x = np.arange(16 * 3).reshape(16, 3)
  chunks = accumulate.split({"x": jnp.asarray(x)}, 4)["x"]
  assert chunks.shape == (4, 4, 3)
  np.testing.assert_array_equal(chunks[1], x[1::4])  # rows 1, 5, 9, 13
  np.testing.assert_array_equal(accumulate.merge(chunks), x)
  with pytest.raises(ValueError, match="does not divide"):
    accumulate.split({"x": jnp.asarray(x)}, 3)


# --------------------------------------------------------------- the real step: CLIP towers


def _clip_config(accum_steps, loss_impl="local"):
  c = helpers.tiny_clip_config(None)
  c.batch_size = 32  # 4 rows per device on the 2 × 4 mesh: up to 4 chunks
  c.model = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, pool="cls"),
                 text=dict(width=32, depth=1, mlp_dim=64, num_heads=2, max_len=16), embed_dim=16)
  c.optim = dict(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, warmup_steps=0,
                 schedule="constant", grad_clip_norm=0.0)
  c.accum_steps, c.loss_impl = accum_steps, loss_impl
  return c


def _clip_batch(n=32, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 17, size=n)
  return {"image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
          "text": rng.integers(1, 1000, size=(n, 16)).astype(np.int32),
          "text_mask": (np.arange(16)[None] < lengths[:, None]).astype(np.int32)}


def _one_update(config, batch):
  s = train_state.setup(config, batch)
  before = jax.device_get(s.state.params)  # the step donates the state
  with jax.set_mesh(s.mesh):
    state, metrics = s.jit_train_step()(s.state, s.frozen, s.device_batch(batch),
                                        jax.random.key(0))
  return jax.device_get(state.params), jax.device_get(metrics), before


class _ToyTwoTower(nn.Module):
  """Two small towers with CLIP's outputs: a Dense image tower, a masked-mean text tower."""

  @nn.compact
  def __call__(self, batch, *, train=False):
    del train
    image_BxF = batch["image"].reshape(batch["image"].shape[0], -1)
    mask_BxL = batch["text_mask"][..., None].astype(jnp.float32)
    text_BxD = jnp.sum(nn.Embed(1000, 16)(batch["text"]) * mask_BxL, 1) / jnp.sum(mask_BxL, 1)
    return {"zimg": nn.Dense(16)(nn.tanh(nn.Dense(32)(image_BxF))),
            "ztxt": nn.Dense(16)(nn.tanh(text_BxD)),
            "logit_scale": jnp.exp(self.param("t_prime", nn.initializers.constant(2.3), ())),
            "logit_bias": self.param("logit_bias", nn.initializers.constant(-10.0), ())}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("impl", ["global", "local"])
def test_accumulated_contrastive_gradient_equals_the_unaccumulated_one(loss, impl):
  """open_clip's accum-freq on two towers: the loss stays over all 32 pairs, so 4 chunks
  of 8 give the whole batch's loss, metrics and gradient (fp32), the logit scale's and
  bias's included."""
  batch = _clip_batch()
  model = _ToyTwoTower()
  params = model.init(jax.random.key(0), batch)["params"]
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  placed = jax.device_put(batch, sharding.batch_sharding(mesh))
  loss_fn = losses.build_loss({loss: 1.0}, impl=impl, mesh=mesh)
  run = lambda steps: jax.jit(lambda p, b: accumulate.value_and_grad(
      _apply(model), loss_fn, p, {}, b, jax.random.key(1), steps))(params, placed)
  loss1, metrics1, grads1, _ = run(1)
  loss4, metrics4, grads4, _ = run(4)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
  _assert_trees_close(metrics4, metrics1, 1e-6)
  _assert_trees_close(grads4, grads1)
  assert optax.global_norm(grads1) > 1e-2 and abs(grads1["t_prime"]) > 1e-4


@pytest.mark.slow
def test_accumulated_contrastive_update_equals_the_unaccumulated_one():
  """The real step (train_state.setup, jit_train_step, the optimiser): the same parameters after
  one update with 1, 2 or 4 chunks, local and global losses alike. CLIP's loss; SigLIP's
  accumulated gradient is checked against the unaccumulated one above, both forms."""
  loss = "clip"
  batch = _clip_batch()
  results = {}
  for accum_steps, impl in ((1, "global"), (4, "local"), (2, "global")):
    config = _clip_config(accum_steps, impl)
    config.losses = {loss: 1.0}
    results[accum_steps] = _one_update(config, batch)
  params, metrics, before = results[1]
  assert _max_difference(params, before) > 1e-3  # the update moved the parameters
  for accum_steps in (4, 2):
    other_params, other_metrics, _ = results[accum_steps]
    _assert_trees_close(other_params, params)
    np.testing.assert_allclose(other_metrics["loss"], metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(other_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-5)


def test_per_device_mean_of_chunk_losses_would_differ():
  """The test above is not met trivially: a chunk's own CLIP loss (negatives from its 8
  pairs only) is not the global batch's, so neither are its gradients."""
  rng = np.random.default_rng(0)
  out = {"zimg": rng.normal(size=(32, 16)).astype(np.float32),
         "ztxt": rng.normal(size=(32, 16)).astype(np.float32), "logit_scale": np.float32(10.0)}
  clip = jax.jit(lambda o: losses.clip_loss(o, {})[0])
  whole = clip(out)
  chunks = accumulate.split({k: out[k] for k in ("zimg", "ztxt")}, 4)
  per_chunk = np.mean([clip({"zimg": chunks["zimg"][k], "ztxt": chunks["ztxt"][k],
                             "logit_scale": out["logit_scale"]}) for k in range(4)])
  assert abs(float(whole) - float(per_chunk)) > 0.1


# -------------------------------------------------- per-example losses: plain microbatching


class _TinyLM(nn.Module):
  """Embeddings → Dense logits, with the `lm` loss's aligned outputs."""

  @nn.compact
  def __call__(self, batch, *, train=False):
    del train
    tokens_BxL = batch["tokens"]
    hidden_BxLxD = nn.Embed(32, 8)(tokens_BxL)
    return {"lm_logits": nn.Dense(32)(hidden_BxLxD)[:, :-1], "lm_targets": tokens_BxL[:, 1:],
            "lm_weights": batch["mask"][:, 1:]}


def _apply(model, frozen=None):
  def apply(params, model_state, batch, rng):
    variables = {"params": optim.merge(params, frozen or {}), **model_state}
    if model_state:
      return model.apply(variables, batch, train=True, rngs={"dropout": rng},
                         mutable=list(model_state))
    return model.apply(variables, batch, train=True, rngs={"dropout": rng}), {}
  return apply


def test_token_weighted_loss_is_microbatched_by_its_token_counts():
  """`lm` averages over target tokens: chunks with more tokens weigh more, so 4 chunks give
  the whole batch's loss and gradient, and the plain mean of the chunks' would not."""
  rng = np.random.default_rng(1)
  mask = (np.arange(12)[None] < rng.integers(2, 13, size=(16, 1))).astype(np.float32)
  batch = {"tokens": jnp.asarray(rng.integers(0, 32, size=(16, 12)), jnp.int32),
           "mask": jnp.asarray(mask)}
  model = _TinyLM()
  params = model.init(jax.random.key(0), batch)["params"]
  loss_fn = losses.build_loss({"lm": 1.0})
  run = lambda steps: jax.jit(lambda p: accumulate.value_and_grad(
      _apply(model), loss_fn, p, {}, batch, jax.random.key(1), steps))(params)
  loss, metrics, grads, _ = run(1)
  loss4, metrics4, grads4, _ = run(4)
  np.testing.assert_allclose(loss4, loss, rtol=1e-6)
  np.testing.assert_allclose(metrics4["lm/num_tokens"], metrics["lm/num_tokens"])
  np.testing.assert_allclose(metrics4["lm/accuracy"], metrics["lm/accuracy"], rtol=1e-6)
  _assert_trees_close(grads4, grads)
  chunk_loss = jax.jit(jax.grad(lambda p, chunk: loss_fn(model.apply({"params": p}, chunk), {})[0]))
  chunks = accumulate.split(batch, 4)
  unweighted = jax.tree.map(lambda *g: sum(g) / 4, *[
      chunk_loss(params, jax.tree.map(lambda x, k=k: x[k], chunks)) for k in range(4)])
  assert _max_difference(unweighted, grads) > 1e-4


def test_a_sum_of_per_example_losses_with_different_counts_is_coupled():
  assert losses.reduction.count_of(losses.build_loss({"softmax_ce": 1.0, "text_byol": 0.5})) \
      == losses.reduction.EXAMPLES
  assert losses.reduction.count_of(losses.build_loss({"lm": 1.0})) == "lm/num_tokens"
  assert losses.reduction.count_of(losses.build_loss({"lm": 1.0, "softmax_ce": 1.0})) is None
  assert losses.reduction.count_of(losses.build_loss({"clip": 1.0, "cosine": 1.0})) is None
  assert losses.reduction.count_of(losses.build_loss({"softmax_ce": 1.0, "text_infonce": 0.0})) \
      == losses.reduction.EXAMPLES  # a switched-off term does not count


# ------------------------------------------- BatchNorm state and frozen parameters (ResNet)


class _ToyClassifier(nn.Module):
  """Dense → BatchNorm → head, with GPT4Image's outputs (logits, zproj, temperature)."""

  @nn.compact
  def __call__(self, batch, *, train=False):
    x_BxF = batch["image"].reshape(batch["image"].shape[0], -1)
    x_BxD = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(16, name="stem")(x_BxF)))
    return {"logits": nn.Dense(5, name="head")(x_BxD), "zproj": nn.Dense(8)(x_BxD),
            "text_temperature": jnp.float32(0.2)}


def _classifier_case(losses_weights, real=False):
  if real:  # GPT4Image's ResNet-18: BatchNorm throughout, its first stage frozen
    model = methods.build_model("gpt4image", dict(num_classes=5, backbone="resnet18", width=4,
                                                  cifar_stem=True, text_dim=8))
    frozen_patterns, size = ("resnet/stage1_.*",), 16
  else:
    model, frozen_patterns, size = _ToyClassifier(), ("stem/.*",), 4
  rng = np.random.default_rng(2)
  batch = {"image": jnp.asarray(rng.normal(size=(16, size, size, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, size=16), jnp.int32),
           "txt_emb": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}
  variables = dict(nn.meta.unbox(model.init(jax.random.key(0), batch)))
  params = dict(variables.pop("params"))
  # GPT4Image's head starts at zero: a random one lets the gradient reach the backbone.
  params["head"] = {**params["head"], "kernel": 0.3 * jax.random.normal(
      jax.random.key(3), params["head"]["kernel"].shape)}
  params, frozen = optim.split_frozen(params, frozen_patterns, None)
  assert frozen and "batch_stats" in variables
  return model, batch, params, frozen, variables, losses.build_loss(losses_weights)


def _reference(model, batch, params, frozen, model_state, loss_fn, steps):
  """By hand: chunk k = rows k::steps, run in order (BatchNorm state threaded), outputs put
  back in the batch's order, the loss over all of them, autodiff through everything."""
  def total(params):
    state, pieces = model_state, []
    for k in range(steps):
      chunk = jax.tree.map(lambda x: x[k::steps], batch)
      out, state = model.apply({"params": optim.merge(params, frozen), **state}, chunk,
                               train=True, mutable=["batch_stats"])
      pieces.append(out)
    outputs = {}
    for key, first in pieces[0].items():
      if np.ndim(first) == 0:
        outputs[key] = first
      else:
        whole = jnp.zeros((steps * first.shape[0], *first.shape[1:]), first.dtype)
        for k, piece in enumerate(pieces):
          whole = whole.at[k::steps].set(piece[key])
        outputs[key] = whole
    loss, _ = loss_fn(outputs, batch)
    return loss, state
  (loss, state), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
  return loss, grads, state


_WEIGHTS = [{"softmax_ce": 1.0}, {"softmax_ce": 1.0, "text_infonce": 0.3}]


def _check_batchnorm_and_frozen(weights, real):
  model, batch, params, frozen, model_state, loss_fn = _classifier_case(weights, real)
  loss, _, grads, new_state = jax.jit(lambda p: accumulate.value_and_grad(
      _apply(model, frozen), loss_fn, p, model_state, batch, jax.random.key(1), 2))(params)
  ref_loss, ref_grads, ref_state = _reference(model, batch, params, frozen, model_state,
                                              loss_fn, 2)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _assert_trees_close(grads, ref_grads)
  _assert_trees_close(new_state, ref_state)
  assert jax.tree.structure(grads) == jax.tree.structure(params)  # nothing frozen gets one
  assert optax.global_norm(grads) > 1e-3
  assert _max_difference(new_state, model_state) > 1e-4  # the statistics moved


@pytest.mark.parametrize("weights", _WEIGHTS, ids=["per_example", "coupled"])
def test_batchnorm_state_and_frozen_parameters(weights):
  """BatchNorm and a frozen layer, accumulated over 2 chunks: the loss, the gradient of
  the trainable parameters and the new BatchNorm statistics are those of the chunks run
  one after the other (each normalised by its own statistics), computed by hand."""
  _check_batchnorm_and_frozen(weights, real=False)


@pytest.mark.slow
def test_batchnorm_state_and_frozen_parameters_of_a_resnet():
  """The same on GPT4Image's ResNet-18 (BatchNorm in every block, first stage frozen), with
  the coupled losses (per-example CE and the batch's InfoNCE)."""
  _check_batchnorm_and_frozen(_WEIGHTS[1], real=True)


def test_train_step_with_frozen_parameters_and_batchnorm_updates_only_the_trainable():
  model, batch, params, frozen, model_state, loss_fn = _classifier_case({"softmax_ce": 1.0})
  tx = optax.sgd(0.1)
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state=model_state)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  placed = jax.device_put(batch, sharding.batch_sharding(mesh))
  new, metrics = jax.jit(lambda s, f, b: train_state.train_step(
      s, f, b, jax.random.key(0), model=model, loss_fn=loss_fn, tx=tx,
      lr_schedule=lambda _: 0.1, accum_steps=2))(state, frozen, placed)
  assert np.isfinite(metrics["loss"]) and int(new.step) == 1
  assert _max_difference(new.params, params) > 1e-4
  assert _max_difference(new.model_state, model_state) > 1e-4
  assert jax.tree.structure(new.params) == jax.tree.structure(params)  # frozen stays out


# ------------------------------------------------------------------ --check and the stages


def test_check_rejects_accum_steps_that_do_not_divide_the_per_device_batch(data_dir):
  config = helpers.tiny_clip_config(data_dir)  # 16 rows over 8 devices: 2 per device
  config.accum_steps = 2
  assert not [p for p in check.check_config(config) if "accum_steps" in p]
  config.accum_steps = 4
  problems = [p for p in check.check_config(config) if "accum_steps" in p]
  assert problems == ["accum_steps: 4 does not divide the per-device batch 2 "
                      "(batch_size / data × fsdp devices)"]
  config.accum_steps, config.loss_impl = 1, "ring"
  assert any(p.startswith("loss_impl: 'ring'") for p in check.check_config(config))


def test_a_stage_keeps_or_overrides_accum_steps_and_check_sees_each_stage(data_dir):
  config = helpers.tiny_clip_config(data_dir)
  config.accum_steps = 2
  config.stages = (dict(name="a", steps=1), dict(name="b", steps=1, accum_steps=4))
  assert stages.stage_config(config, 0, "w").accum_steps == 2
  assert stages.stage_config(config, 1, "w").accum_steps == 4
  problems = check.check_config(config)
  assert [p for p in problems if "accum_steps" in p] == [
      "stages[1] (b): accum_steps: 4 does not divide the per-device batch 2 "
      "(batch_size / data × fsdp devices)"]


@pytest.mark.integration
def test_a_staged_run_accumulates_with_frozen_towers(data_dir, tmp_path):
  """Two stages of the tiny CLIP on real data, the first accumulating over 2 chunks with the
  image tower frozen: the run finishes, the frozen tower comes out of stage 0 as it went in
  and the text tower moved; stage 1 (one chunk, everything trains) moves the image tower."""
  config = helpers.tiny_clip_config(data_dir)
  config.evals = {}
  config.stages = (dict(name="text", steps=2, trainable=("txt.*",), accum_steps=2),
                   dict(name="all", steps=2))  # its first step has warm-up lr 0
  workdir = str(tmp_path / "run")
  last = stages.run(config, workdir)
  assert np.isfinite(last["loss"])
  dirs = [stages.stage_dir(workdir, i, st) for i, st in enumerate(config.stages)]
  first = stages.stage_config(config, 0, workdir)
  batch = {"image": np.zeros((16, 32, 32, 3), np.float32), "text": np.ones((16, 16), np.int32),
           "text_mask": np.ones((16, 16), np.int32)}
  s0 = train_state.setup(first, batch)
  init = s0.variables(s0.state)["params"]
  after = [init_params.load_params(f"{d}/final_params") for d in dirs]
  assert _max_difference(after[0]["img"], init["img"]) == 0.0
  assert _max_difference(after[0]["txt"], init["txt"]) > 0.0
  assert _max_difference(after[1]["img"], after[0]["img"]) > 0.0
