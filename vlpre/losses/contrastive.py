"""Image–text losses on a pair of embeddings: CLIP, SigLIP, LIFT's cosine.

`outputs` is what the model returned for the GLOBAL batch: negatives come from the whole
global batch, whichever layout computes the pairwise term (`config.loss_impl`):

  global  `clip_loss`, `siglip_loss`: the B×B logits as one array under jit; XLA places
          them and inserts the all-gathers.
  local   `local_losses(mesh)`: each device scores its own b = B/D images (D = data × fsdp
          devices) against the texts of every device, under shard_map. CLIP all-gathers
          the texts into one b×B block per device and combines the text→image
          log-sum-exps over devices (two psums of B numbers); the gather's transpose,
          a reduce-scatter, returns each device's share of the text gradient
          (open_clip's local loss with gather-with-grad, with one block instead of
          two). SigLIP passes the text shards round a ring of ppermutes, one b×b block
          at a time (SigLIP's chunked loss), rematerialised in the backward pass. Same
          values and gradients as global; per-device memory of the pairwise term falls
          with D (docs/scaling.md).
Both layouts run the same per-block code (`_clip_sums`, `_sigmoid_sum`): global is the
one block of all rows.

Shape letters: B batch, b rows of one device (B/D), E embedding dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from vlpre import sharding
from vlpre.losses import reduction


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(‖x‖, eps), like torch.nn.functional.normalize: the package's one l2-normalise.

  Written as x·rsqrt(max(‖x‖², eps²)), the same value, so that a zero vector has a finite
  gradient (the gradient of ‖x‖ = sqrt(Σx²) is infinite at 0). The sum of squares is taken
  in float32 whatever x's dtype: eps² underflows in float16, and bf16 sums lose digits.
  """
  sum_sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return (x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))).astype(x.dtype)


def info_nce(logits_BxB, *, symmetric: bool = True):
  """Cross-entropy with the diagonal as targets; averaged over both directions if symmetric."""
  labels_B = jnp.arange(logits_BxB.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits_BxB, labels_B).mean()
  if not symmetric:
    return i2t, {"i2t_loss": i2t}
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits_BxB.T, labels_B).mean()
  return 0.5 * (i2t + t2i), {"i2t_loss": i2t, "t2i_loss": t2i}


def _clip_sums(zimg_bxE, ztxt_BxE, scale, first_row, across=None):
  """Images first_row..first_row+b of the global batch against all B texts: the summed
  image→text and text→image cross-entropies of those rows' pairs, and their top-1 hits.

  The text→image direction needs each text's log-sum-exp over all B images, whose rows
  are spread over devices: each device reduces its b rows per column, and `across` (the
  batch mesh axes under shard_map; None for one global array) combines them. Each device
  then counts the texts of its own rows, so one b×B block serves both directions.
  """
  psum = (lambda x: x) if across is None else functools.partial(jax.lax.psum, axis_name=across)
  pmax = (lambda x: x) if across is None else functools.partial(jax.lax.pmax, axis_name=across)
  rows_b = jnp.arange(zimg_bxE.shape[0])
  labels_b = first_row + rows_b
  logits_bxB = scale * zimg_bxE @ ztxt_BxE.T
  positive_b = logits_bxB[rows_b, labels_b]
  i2t = jnp.sum(jax.nn.logsumexp(logits_bxB, axis=1) - positive_b)
  column_max_B = pmax(jax.lax.stop_gradient(jnp.max(logits_bxB, axis=0)))
  column_lse_B = column_max_B + jnp.log(psum(jnp.sum(jnp.exp(logits_bxB - column_max_B), axis=0)))
  t2i = jnp.sum(column_lse_B[labels_b] - positive_b)
  hits = jnp.sum(jnp.argmax(logits_bxB, axis=1) == labels_b)
  return i2t, t2i, hits


def _clip_metrics(i2t, t2i, hits, scale, batch_size):
  i2t, t2i = i2t / batch_size, t2i / batch_size
  return 0.5 * (i2t + t2i), {"i2t_loss": i2t, "t2i_loss": t2i,
                             "i2t_accuracy": hits / batch_size, "logit_scale": scale}


def _normalized(outputs):
  return (l2_normalize(outputs["zimg"].astype(jnp.float32)),
          l2_normalize(outputs["ztxt"].astype(jnp.float32)))


def clip_loss(outputs, batch):
  """CLIP: symmetric InfoNCE on L2-normalised embeddings with a learnable temperature."""
  del batch
  zimg_BxE, ztxt_BxE = _normalized(outputs)
  scale = outputs["logit_scale"]
  return _clip_metrics(*_clip_sums(zimg_BxE, ztxt_BxE, scale, 0), scale, zimg_BxE.shape[0])


def _sigmoid_sum(zimg_bxE, ztxt_cxE, scale, bias, own_block: bool):
  """−Σ log σ(z_ij (t·⟨x_i, y_j⟩ + b)) over a block of b images × c texts; z = +1 on the
  diagonal of a device's own block, −1 everywhere else."""
  logits_bxc = scale * zimg_bxE @ ztxt_cxE.T + bias
  if not own_block:
    return -jnp.sum(jax.nn.log_sigmoid(-logits_bxc))
  z_bxc = 2.0 * jnp.eye(*logits_bxc.shape) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z_bxc * logits_bxc))


def siglip_loss(outputs, batch):
  """SigLIP: −1/B Σ_i Σ_j log σ(z_ij (t·⟨x_i, y_j⟩ + b)), z = +1 on the diagonal, −1 off it."""
  del batch
  zimg_BxE, ztxt_BxE = _normalized(outputs)
  scale, bias = outputs["logit_scale"], outputs["logit_bias"]
  loss = _sigmoid_sum(zimg_BxE, ztxt_BxE, scale, bias, True) / zimg_BxE.shape[0]
  return loss, {"logit_scale": scale, "logit_bias": bias}


def local_losses(mesh: jax.sharding.Mesh) -> dict:
  """`clip` and `siglip` laid out per device over `mesh`'s batch axes (module docstring):
  the same values, metrics and gradients as the global ones, with the one signature."""
  axes = sharding.BATCH_AXES
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  rows, same = P(axes), P()

  def per_device(body):
    """`body(zimg_bxE, ztxt_bxE, scale, bias) -> (loss, metrics)` under shard_map."""
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, same, same), out_specs=same)

    def loss_fn(outputs, batch):
      del batch
      zimg_BxE, ztxt_BxE = _normalized(outputs)
      return mapped(zimg_BxE, ztxt_BxE, outputs["logit_scale"],
                    outputs.get("logit_bias", jnp.zeros((), jnp.float32)))
    return loss_fn

  def clip(zimg_bxE, ztxt_bxE, scale, bias):
    del bias
    rows_here = zimg_bxE.shape[0]
    ztxt_BxE = jax.lax.all_gather(ztxt_bxE, axes, tiled=True)
    sums = _clip_sums(zimg_bxE, ztxt_BxE, scale, jax.lax.axis_index(axes) * rows_here, axes)
    return _clip_metrics(*jax.lax.psum(sums, axes), scale, rows_here * devices)

  def siglip(zimg_bxE, ztxt_bxE, scale, bias):
    ring = [(i, (i + 1) % devices) for i in range(devices)]
    # Rematerialised: the backward pass recomputes each visit's b×b logits from the
    # b×E texts it kept, instead of keeping every block's logits.
    negatives = jax.checkpoint(functools.partial(_sigmoid_sum, own_block=False))

    def visit(carry, _):  # the next device's texts arrive; all of them are negatives
      ztxt_visiting_bxE, total = carry
      ztxt_visiting_bxE = jax.lax.ppermute(ztxt_visiting_bxE, axes, ring)
      return (ztxt_visiting_bxE,
              total + negatives(zimg_bxE, ztxt_visiting_bxE, scale, bias)), None

    own = _sigmoid_sum(zimg_bxE, ztxt_bxE, scale, bias, True)
    (_, total), _ = jax.lax.scan(visit, (ztxt_bxE, own), length=devices - 1)
    loss = jax.lax.psum(total, axes) / (zimg_bxE.shape[0] * devices)
    return loss, {"logit_scale": scale, "logit_bias": bias}

  return {"clip": per_device(clip), "siglip": per_device(siglip)}


@reduction.per_example()
def cosine_loss(outputs, batch):
  """LIFT's `simplistic_cos`: mean(1 − cos(z_img, z_txt)), positives only, no temperature."""
  del batch
  zimg_BxE, ztxt_BxE = _normalized(outputs)
  cos_B = jnp.sum(zimg_BxE * ztxt_BxE, axis=-1)
  return jnp.mean(1.0 - cos_B), {"cosine": jnp.mean(cos_B)}


LOSSES = {
    "clip": clip_loss,
    "siglip": siglip_loss,
    "cosine": cosine_loss,
}
