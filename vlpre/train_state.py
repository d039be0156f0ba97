"""The train state, the pure step and `setup`, which builds both for a config.

`setup` makes the mesh, the method's model and the sharded state (trainable parameters,
optimizer state, mutable collections) with the frozen parameters as their own sharded
argument; `Setup.jit_train_step` jits `train_step` over them. `vlpre.train.run` drives
it; `vlpre.evaluate`, `vlpre.compile`, the benchmarks and the notebooks build the same
state without training (restoring it, or only its shapes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlpre import accumulate
from vlpre import init_params
from vlpre import llm as llm_lib
from vlpre import losses as losses_lib
from vlpre import methods
from vlpre import optim
from vlpre import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any       # trainable parameters only
  opt_state: Any
  model_state: Any  # mutable collections, e.g. {"batch_stats": ...}


def train_step(state: TrainState, frozen: Any, batch: dict, rng: jax.Array, *, model: nn.Module,
               loss_fn: losses_lib.LossFn, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule, accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One update. Pure: jitted once with in/out shardings, the state donated.

  `accum_steps` > 1 computes the gradient over that many chunks of the batch
  (vlpre/accumulate.py): the same update, with one chunk's activations alive at a time.
  """
  rng = jax.random.fold_in(rng, state.step)
  mutable = list(state.model_state.keys())

  def apply(params, model_state, batch, rng):
    variables = {"params": optim.merge(params, jax.lax.stop_gradient(frozen)), **model_state}
    rngs = {"dropout": rng, "aug": jax.random.fold_in(rng, 1)}
    if mutable:
      return model.apply(variables, batch, train=True, rngs=rngs, mutable=mutable)
    return model.apply(variables, batch, train=True, rngs=rngs), {}

  loss, metrics, grads, new_model_state = accumulate.value_and_grad(
      apply, loss_fn, state.params, state.model_state, batch, rng, accum_steps)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
             "param_norm": optax.global_norm(params),
             "learning_rate": lr_schedule(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=new_model_state)
  return new_state, metrics


@dataclasses.dataclass
class Setup:
  """Everything `run`, `evaluate` and the benchmarks build from a config."""
  config: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  built: methods.Built
  state: TrainState
  state_shardings: TrainState
  frozen: Any
  frozen_shardings: Any
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  loss_fn: losses_lib.LossFn
  batch_sharding: jax.sharding.NamedSharding

  @property
  def model(self) -> nn.Module:
    return self.built.model

  def variables(self, state: TrainState | None = None) -> dict:
    state = state or self.state
    return {"params": optim.merge(state.params, self.frozen), **state.model_state}

  def jit_train_step(self) -> Callable:
    step = functools.partial(train_step, model=self.model, loss_fn=self.loss_fn, tx=self.tx,
                             lr_schedule=self.lr_schedule,
                             accum_steps=self.config.get("accum_steps", 1))
    replicated = sharding.replicated(self.mesh)
    return jax.jit(step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                       self.batch_sharding, replicated),
                   out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))

  def device_batch(self, batch: dict) -> dict:
    """Host-local numpy batch → global arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items() if not k.startswith("_")}


def _shardings_for(abstract_variables, mesh, rules, min_fsdp_size):
  """Logical names where the model gave them, fsdp over the largest dim for big bare leaves."""
  logical = sharding.logical_shardings(abstract_variables, mesh, rules)
  fallback = sharding.fsdp_fallback(nn.meta.unbox(abstract_variables), mesh, min_fsdp_size)
  boxed = jax.tree.map(lambda x: isinstance(x, nn.Partitioned), abstract_variables,
                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree.map(lambda is_boxed, l, f: l if is_boxed else f, boxed, logical, fallback)


def with_shardings(shapes, shardings):
  """ShapeDtypeStructs of `shapes` placed as `shardings` says (the abstract `setup`)."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      shapes, shardings)


def setup(config, example_batch: dict, *, mesh=None, abstract: bool = False,
          restoring: bool = False) -> Setup:
  """Builds the mesh, the model, and the sharded train state (never materialised unsharded).

  `abstract`: no weight is materialised or loaded. The state and the frozen parameters are
  `jax.ShapeDtypeStruct`s carrying their shardings (`example_batch` may be too), which is
  all `jit_train_step().lower(...)` needs: vlpre.compile compiles the real step this way for
  devices this host does not have. A pretrained model the method builds on (an LLM, a
  text encoder) is read from its config and tokenizer alone (`llm.abstract_weights`).

  `restoring`: the train state is about to come from a checkpoint (vlpre.evaluate), so it
  stays abstract as above (nothing is initialised at random, no optimizer state is built),
  while the frozen parameters, which no checkpoint holds, are loaded as for training. A
  frozen parameter that only the random init gives (no pretrained or `init_from` weight)
  makes it build everything as for training.
  """
  mesh = mesh or sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.get("sharding_rules"))
  with llm_lib.abstract_weights() if abstract else contextlib.nullcontext():
    built = methods.build(config)
  model = built.model
  batch_sh = sharding.batch_sharding(mesh)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % dp:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {dp} data-parallel "
                     f"devices of mesh {dict(mesh.shape)}")
  if problem := accumulate.steps_problem(config.batch_size // dp, config.get("accum_steps", 1)):
    raise ValueError(problem)
  example = {k: v if abstract else jnp.asarray(v) for k, v in example_batch.items()
             if not k.startswith("_")}
  rng = jax.random.key(config.seed)

  def init(rng, example):
    return model.init({"params": rng, "dropout": rng, "aug": rng}, example, train=False)

  # Traced under the mesh and rules, so the model's logical constraints apply; unboxed
  # outside them (a boxed shape or sharding is metadata, not a value to constrain).
  with sharding.active(mesh, rules):
    shapes = jax.eval_shape(init, rng, example)
  var_shardings = nn.meta.unbox(
      _shardings_for(shapes, mesh, rules, config.get("min_fsdp_size", 2**18)))
  for prefix, axes in (built.logical_axes or {}).items():
    var_shardings["params"][prefix] = sharding.logical_names_to_shardings(axes, mesh, rules)
  if abstract or restoring:
    variables = with_shardings(nn.meta.unbox(shapes), var_shardings)
  else:
    with sharding.active(mesh, rules):
      variables = jax.jit(init, out_shardings=var_shardings)(rng, example)
    variables = nn.meta.unbox(variables)
  if not abstract:  # pretrained and init_from weights replace values, not shapes
    variables = {**variables, "params": init_params.place_weights(
        config, built, variables["params"], var_shardings["params"])}
  params, param_sh = variables.pop("params"), var_shardings.pop("params")
  model_state, model_state_sh = variables, var_shardings
  frozen_patterns = tuple(config.get("frozen", ()))
  trainable = config.get("trainable")  # None: everything not frozen trains
  trainable = None if trainable is None else tuple(trainable)
  params, frozen = optim.split_frozen(params, frozen_patterns, trainable)
  param_sh, frozen_sh = optim.split_frozen(param_sh, frozen_patterns, trainable)
  if restoring and not abstract and any(
      isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
    logging.info("frozen parameters without pretrained weights: initialising them at random")
    return setup(config, example_batch, mesh=mesh)
  if config.get("check_fsdp_sharding", True):
    sharding.assert_sharded(params, param_sh, min_size=config.get("min_fsdp_size", 2**18))
    sharding.assert_sharded(frozen, frozen_sh, min_size=config.get("min_fsdp_size", 2**18))

  tx, lr_schedule = optim.build_optimizer(config.optim, config.total_steps)
  abstract_opt = jax.eval_shape(tx.init, params)
  replicated = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                        model_state=model_state_sh)
  if abstract or restoring:
    state = with_shardings(TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                       opt_state=abstract_opt, model_state=model_state), state_sh)
  else:
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                       opt_state=jax.jit(tx.init, out_shardings=opt_sh)(params),
                       model_state=model_state)
  logging.info("parameters: %s trainable, %s frozen",
               f"{sum(x.size for x in jax.tree.leaves(params)):,}",
               f"{sum(x.size for x in jax.tree.leaves(frozen)):,}")
  return Setup(config=config, mesh=mesh, rules=rules, built=built, state=state,
               state_shardings=state_sh, frozen=frozen, frozen_shardings=frozen_sh, tx=tx,
               lr_schedule=lr_schedule,
               loss_fn=losses_lib.build_loss(dict(config.losses), methods.of(config).losses,
                                             impl=config.get("loss_impl", "local"), mesh=mesh),
               batch_sharding=batch_sh)
