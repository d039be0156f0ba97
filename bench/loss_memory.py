"""Per-device memory of the contrastive losses' pairwise term against the device count,
and of a train step against `accum_steps`.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/loss_memory.py [--batch=4096]

For each loss (CLIP, SigLIP) and layout (`config.loss_impl`: global, local), compiles the
loss and its gradient with respect to both embeddings, the logit scale and the bias on
CPU meshes of 1, 2, 4 and 8 devices (the batch split over `data`), and prints the
compiled program's per-device temporary bytes (`memory_analysis()`), the memory the B×B
term and its gradient take beside the fixed-size embeddings. Then the same for the
tests' tiny CLIP train step at batch 512 on 8 devices with 1 and 8 accumulation chunks.
Nothing runs; it compiles.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402

from tests import helpers  # noqa: E402
from vlpre import losses as losses_lib  # noqa: E402
from vlpre import sharding  # noqa: E402
from vlpre import train_state  # noqa: E402
from vlpre.losses import contrastive  # noqa: E402

DEVICE_COUNTS = (1, 2, 4, 8)


def loss_fn(name: str, impl: str, mesh: jax.sharding.Mesh):
  """The loss `config.loss_impl = impl` selects for `name`."""
  return contrastive.local_losses(mesh)[name] if impl == "local" else losses_lib.LOSSES[name]


def temp_bytes(name: str, impl: str, devices: int, batch: int, dim: int) -> int:
  """Per-device temporary bytes of the compiled loss-and-gradient on `devices` devices."""
  mesh = sharding.make_mesh([("data", devices)], jax.devices()[:devices])
  rows, same = NamedSharding(mesh, P(sharding.BATCH_AXES)), NamedSharding(mesh, P())
  fn = loss_fn(name, impl, mesh)
  outputs = {"zimg": jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows),
             "ztxt": jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows),
             "logit_scale": jax.ShapeDtypeStruct((), jnp.float32, sharding=same),
             "logit_bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=same)}
  step = jax.jit(jax.value_and_grad(lambda o: fn(o, {}), has_aux=True))
  return step.lower(outputs).compile().memory_analysis().temp_size_in_bytes


def step_temp_bytes(accum_steps: int, batch: int = 512) -> int:
  """Per-device temporary bytes of the tiny CLIP train step (tests.helpers) on 8 devices."""
  config = helpers.tiny_clip_config(None)
  config.batch_size, config.accum_steps = batch, accum_steps
  example = {"image": np.zeros((batch, 32, 32, 3), np.float32),
             "text": np.ones((batch, 16), np.int32), "text_mask": np.ones((batch, 16), np.int32)}
  s = train_state.setup(config, example)
  with jax.set_mesh(s.mesh):
    lowered = s.jit_train_step().lower(s.state, s.frozen, s.device_batch(example),
                                       jax.random.key(0))
  return lowered.compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4096, help="global batch B")
  parser.add_argument("--dim", type=int, default=256, help="embedding dim E")
  args = parser.parse_args()
  if jax.device_count() < max(DEVICE_COUNTS):
    raise SystemExit(f"needs {max(DEVICE_COUNTS)} devices: "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  print(f"B = {args.batch}, E = {args.dim}: per-device temporary MiB of loss + gradient")
  columns = " | ".join(f"{d} device{'s' * (d > 1)}" for d in DEVICE_COUNTS)
  print(f"| loss | layout | {columns} |")
  print("|---|---|" + "---|" * len(DEVICE_COUNTS))
  for name in ("clip", "siglip"):
    for impl in ("global", "local"):
      mib = [temp_bytes(name, impl, d, args.batch, args.dim) / 2**20 for d in DEVICE_COUNTS]
      print(f"| {name} | {impl} | " + " | ".join(f"{m:.1f}" for m in mib) + " |")
  print("\ntiny CLIP train step, batch 512 on 8 devices: per-device temporary MiB")
  for accum_steps in (1, 8):
    print(f"accum_steps={accum_steps}: {step_temp_bytes(accum_steps) / 2**20:.1f}")


if __name__ == "__main__":
  main()
