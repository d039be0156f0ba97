"""What ViT-B/16 CLIP and LIFT (7B embedder) steps cost at the paper's batch, on paper:
FLOPs and bytes from XLA's cost analysis of the lowered step (abstract shapes only,
jax.ShapeDtypeStruct: no weights are loaded or allocated), what each device holds under
the planned mesh, and the step time an accelerator would need at a given MFU.

    XLA_FLAGS= python bench/accelerator_plan.py            # prints the markdown tables

The towers are lowered unscanned and without remat, so the cost analysis counts every
layer once (model FLOPs, what MFU divides; remat adds ~1/3 more executed FLOPs).
Peak FLOP/s (dense bf16, per chip) and HBM bandwidth are the vendors' spec sheets:
NVIDIA H100 SXM 989 TFLOP/s, 3.35 TB/s (NVIDIA H100 Tensor Core GPU datasheet); the TPUs'
come from `vlpre.compile.CHIPS` (with their sources). `python -m vlpre.compile` compiles
the real steps for a TPU slice instead, with their memory (docs/scaling.md).
"""
from __future__ import annotations

import os

import common

common.use_one_device()

import shapes_only_llm  # noqa: E402  (bench/, beside this script)

from absl import app, flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vlpre import compile as compile_lib  # noqa: E402
from vlpre import config_lib  # noqa: E402
from vlpre import llm as llm_lib  # noqa: E402
from vlpre import losses as losses_lib  # noqa: E402
from vlpre import optim  # noqa: E402
from vlpre import train_state  # noqa: E402
from vlpre import methods  # noqa: E402
from vlpre.methods.lift import model as lift  # noqa: E402
from vlpre.methods.two_tower import model as two_tower  # noqa: E402
from vlpre.text_encoders import PooledTextEncoder  # noqa: E402

_CHIPS = flags.DEFINE_integer("chips", 256, "accelerator chips the global batch is split over")
_MFU = flags.DEFINE_list("mfu", ["0.35", "0.5"], "MFU values to turn FLOPs into step times")

ACCELERATORS = {  # dense bf16 FLOP/s, HBM bytes/s, HBM bytes per chip; TPUs: vlpre.compile's
    "H100 SXM": (989e12, 3.35e12, 80e9),
    **{f"TPU {name}": (compile_lib.CHIPS[name].peak_flops, compile_lib.CHIPS[name].hbm_bandwidth,
                       compile_lib.CHIPS[name].hbm_bytes) for name in ("v5e", "v5p")},
}

# Mistral-7B's architecture (NV-Embed-v2's backbone): the 7B embedder of configs/lift.py.
MISTRAL_7B = llm_lib.DecoderConfig.from_hf(
    shapes_only_llm.hf_config(shapes_only_llm.PRESETS["mistral-7b"]))


def _towers_flat(image: dict) -> dict:
  return {**image, "scan": False, "remat": False}


def clip_case():
  c = config_lib.load(os.path.join(common.ROOT, "configs", "clip.py"))
  model = two_tower.Model(image=_towers_flat(c.model.image), text=_towers_flat(c.model.text),
                          embed_dim=c.model.embed_dim, dtype=jnp.bfloat16)
  b, size, length = c.batch_size, c.input.image_size, c.model.text.max_len
  batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
           "text": jax.ShapeDtypeStruct((b, length), jnp.int32),
           "text_mask": jax.ShapeDtypeStruct((b, length), jnp.int32)}
  return "CLIP ViT-B/16 + text 512×12, 77 tokens", c, model, batch, ()


def lift_case(online: bool):
  c = config_lib.load(os.path.join(common.ROOT, "configs", "lift.py"))
  encoder = PooledTextEncoder(
      backbone=llm_lib.Decoder(MISTRAL_7B, dtype=jnp.bfloat16, scan=False), pooling="last")
  model = lift.Model(image=_towers_flat(c.model.image), text_dim=MISTRAL_7B.hidden_size,
                     txt_encoder=encoder, text_max_len=77, dtype=jnp.bfloat16)
  b, size = c.batch_size, c.input.image_size
  batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)}
  if online:
    batch["text"] = jax.ShapeDtypeStruct((b, 77), jnp.int32)
    batch["text_mask"] = jax.ShapeDtypeStruct((b, 77), jnp.int32)
    label = "LIFT online: ViT-B/16 + frozen 7B forward, 77 tokens"
  else:
    batch["txt_emb"] = jax.ShapeDtypeStruct((b, MISTRAL_7B.hidden_size), jnp.float32)
    label = "LIFT cached: ViT-B/16 vs stored 7B embeddings"
  return label, c, model, batch, tuple(c.frozen)


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def plan(label, config, model, batch, frozen_patterns):
  """Cost analysis of the lowered train step on abstract state and batch."""
  init_batch = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in batch.items()}
  boxed = jax.eval_shape(model.init, jax.random.key(0), init_batch)["params"]
  params = nn.meta.unbox(boxed)
  trainable, frozen = optim.split_frozen(params, frozen_patterns)
  if frozen:  # frozen weights in the compute dtype: nothing updates them
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), frozen)
  tx, schedule = optim.build_optimizer(config.optim, config.total_steps)
  opt_state = jax.eval_shape(tx.init, trainable)
  state = train_state.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                           opt_state=opt_state, model_state={})
  step = jax.jit(lambda s, f, b, r: train_state.train_step(
      s, f, b, r, model=model, loss_fn=losses_lib.build_loss(
          dict(config.losses), methods.of(config).losses), tx=tx,
      lr_schedule=schedule))
  lowered = step.lower(state, frozen, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"label": label, "batch": config.batch_size, "flops": float(cost["flops"]),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
          "trainable_bytes": _bytes(trainable), "opt_bytes": _bytes(opt_state),
          "frozen_bytes": _bytes(frozen), "trainable_params": _bytes(trainable) // 4}


def main(argv):
  del argv
  chips = _CHIPS.value
  rows = [plan(*case) for case in (clip_case(), lift_case(False), lift_case(True))]
  print(f"\n| step | batch | TFLOP/step | TFLOP/image | bytes accessed/step (GB) | trainable "
        f"params | optimizer state GB | frozen weights GB (bf16) |\n|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['label']} | {r['batch']} | {r['flops'] / 1e12:.0f} | "
          f"{r['flops'] / r['batch'] / 1e12:.3f} | {r['bytes_accessed'] / 1e9:.0f} | "
          f"{r['trainable_params'] / 1e6:.0f} M | {r['opt_bytes'] / 1e9:.2f} | "
          f"{r['frozen_bytes'] / 1e9:.1f} |")
  mfus = [float(m) for m in _MFU.value]
  print(f"\nStep time on {chips} chips (data-parallel over the batch) at MFU "
        f"{', '.join(f'{m:.0%}' for m in mfus)}; arithmetic intensity = FLOPs / bytes "
        f"accessed vs the chip's ridge point (peak / HBM bandwidth):\n")
  print("| step | accelerator | s/step at MFU | images/s/chip | intensity (FLOP/B) | ridge "
        "(FLOP/B) |\n|---|---|---|---|---|---|")
  for r in rows:
    for name, (peak, bw, _) in ACCELERATORS.items():
      times = " / ".join(f"{r['flops'] / (chips * peak * m):.2f}" for m in mfus)
      ips = " / ".join(f"{r['batch'] / (r['flops'] / (chips * peak * m)) / chips:.0f}"
                       for m in mfus)
      print(f"| {r['label']} | {name} | {times} | {ips} | "
            f"{r['flops'] / r['bytes_accessed']:.0f} | {peak / bw:.0f} |")
  print("\nPer-device memory (weights + AdamW state, fsdp shards over the chips):")
  for r in rows:
    for fsdp in (1, 8, chips):
      held = (r["trainable_bytes"] + r["opt_bytes"] + r["frozen_bytes"]) / fsdp
      fits = ", ".join(f"{n} {'fits' if held < hbm else 'does not fit'}"
                       for n, (_, _, hbm) in ACCELERATORS.items())
      print(f"  {r['label']}, fsdp={fsdp}: {held / 1e9:.2f} GB of weights/state per device "
            f"({fits}, before activations)")


if __name__ == "__main__":
  app.run(main)
