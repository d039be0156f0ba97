"""Attentive probe on frozen per-patch features: attention pooling + a linear head, trained.

As the attentive probes of V-JEPA and AIM (and LCL's and HIVE's frozen-transfer
evaluation): one learnable query attends over an image's N frozen tokens by multi-head
cross-attention, the pooled vector is layer-normalised, and a linear head classifies it.
Only the probe trains, with AdamW, on features embedded once and held on the host. Unlike
the linear probe on a pooled feature (linear_probe.py), it can read a class signal that a
few tokens carry and that averaging drowns.

Features come from the model method `cfg.method` (default "embed_patches", [B, N, D]).
Training is deterministic given `seed`: the probe's init and the minibatch order.

Shape letters: X examples of a split (local to this file); B, N, D, C as in the README.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlpre import optim
from vlpre.evaluators import common


class AttentiveProbe(nn.Module):
  """Learnable query → multi-head cross-attention over the tokens → LayerNorm → linear.

  Not layers.MapHead: that block adds an MLP residual and logical-axis annotations for
  the sharded trainer; the probe is the plain pooler the attentive-probe papers use.
  """
  num_classes: int
  num_heads: int

  @nn.compact
  def __call__(self, x_BxNxD):
    batch, _, width = x_BxNxD.shape
    query_1x1xD = self.param("query", nn.initializers.normal(0.02), (1, 1, width))
    pooled_Bx1xD = nn.MultiHeadDotProductAttention(self.num_heads, name="attention")(
        jnp.broadcast_to(query_1x1xD, (batch, 1, width)), x_BxNxD)
    pooled_BxD = nn.LayerNorm(name="norm")(pooled_Bx1xD[:, 0])
    return nn.Dense(self.num_classes, name="head")(pooled_BxD)


@functools.lru_cache(maxsize=8)
def _optimizer(lr: float, steps: int, weight_decay: float) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine; cached so equal settings reuse the compiled step."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 1))
  return optax.adamw(schedule, weight_decay=weight_decay, mask=optim.weight_decay_mask)


def _logits(probe, params, x_BxNxD, mean_D, std_D):
  return probe.apply({"params": params}, (x_BxNxD - mean_D) / std_D)


@functools.partial(jax.jit, static_argnames=("probe", "tx"))
def _train_step(params, opt_state, x_BxNxD, y_B, mean_D, std_D, *, probe, tx):
  def loss_fn(params):
    logits_BxC = _logits(probe, params, x_BxNxD, mean_D, std_D)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, y_B).mean()
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("probe",))
def _predict(params, x_BxNxD, mean_D, std_D, *, probe):
  return jnp.argmax(_logits(probe, params, x_BxNxD, mean_D, std_D), axis=-1)


def train_probe(x_XxNxD: np.ndarray, y_X: np.ndarray, num_classes: int, *, steps: int,
                lr: float, weight_decay: float, batch_size: int, num_heads: int,
                seed: int = 0):
  """Trains a probe on host features; returns (predict(x_XxNxD) -> labels [X], losses [steps])."""
  # Per-channel standardisation with the training split's statistics, as linear_probe
  # does: feature scales differ by model (LayerNormed ViT tokens, post-ReLU ResNet maps).
  mean_D = x_XxNxD.mean(axis=(0, 1))
  std_D = x_XxNxD.std(axis=(0, 1)) + 1e-6
  probe = AttentiveProbe(num_classes, num_heads)
  tx = _optimizer(float(lr), int(steps), float(weight_decay))
  params = probe.init(jax.random.key(seed), jnp.asarray(x_XxNxD[:1]))["params"]
  opt_state = tx.init(params)
  batch_size = min(batch_size, len(x_XxNxD))
  order = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    rows = order.choice(len(x_XxNxD), batch_size, replace=False)
    params, opt_state, loss = _train_step(params, opt_state, x_XxNxD[rows], y_X[rows],
                                          mean_D, std_D, probe=probe, tx=tx)
    losses.append(loss)

  def predict(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(_predict(params, x[i:i + batch_size], mean_D, std_D,
                                               probe=probe))
                           for i in range(0, len(x), batch_size)])

  return predict, np.asarray(jax.device_get(losses))


class Evaluator:
  """cfg: train_data, test_data (globs), num_classes, image_size, resize_size, batch_size
  (of embedding and of the probe's steps), max_train_examples, max_examples, method
  (default "embed_patches"), steps, lr, weight_decay, num_heads (must divide D), seed.
  """

  def __init__(self, name, cfg, predictor: common.Predictor):
    self.name, self.cfg, self.predictor = name, cfg, predictor

  def _features(self, variables, pattern, max_examples):
    method = self.cfg.get("method", "embed_patches")
    batches = common.eval_batches(self.cfg, pattern, max_examples=max_examples, with_labels=True)
    out = self.predictor.image_outputs(variables, batches, method)
    return out[method], out["label"]

  def run(self, variables) -> dict[str, float]:
    cfg = self.cfg
    x_train, y_train = self._features(variables, cfg["train_data"], cfg.get("max_train_examples", 0))
    x_test, y_test = self._features(variables, cfg["test_data"], cfg.get("max_examples", 0))
    predict, losses = train_probe(
        x_train, y_train, cfg["num_classes"], steps=cfg.get("steps", 1000), lr=cfg.get("lr", 1e-3),
        weight_decay=cfg.get("weight_decay", 1e-4), batch_size=cfg.get("batch_size", 256),
        num_heads=cfg.get("num_heads", 4), seed=cfg.get("seed", 0))
    return {f"{self.name}/top1": float(np.mean(predict(x_test) == y_test)),
            f"{self.name}/train_loss": float(losses[-max(1, len(losses) // 10):].mean())}
