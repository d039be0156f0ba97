"""Where a vlpre train step's time goes: a jax.profiler trace of the compiled step, each
XLA:CPU op's time summed by what it computes (tower, block part, forward/backward).

    XLA_FLAGS= python bench/profile_step.py                          # tiny CLIP, batch 64
    python bench/profile_step.py --set=model.image.attention=dot_product_attention \\
        --set=model.text.attention=dot_product_attention --set=model.image.unroll=1

Each op event of the trace (XLA:CPU runs one "thunk" per HLO instruction or fusion)
is mapped to the instruction's `op_name` metadata in the compiled HLO, which names
the Flax module path (img/encoder/blocks/attn/...) and the transformation (`jvp(...)`
forward, `transpose(jvp(...))` backward; neither: the optimizer update). Op times are
summed across the runtime's threads, so they add up to more than the step's wall time
when ops run in parallel; the shares are what compare. The tracer itself slows the
YNNPACK matmul thunks (a lone 4928×192 @ 192×768 matmul: 3.9 ms untraced, 8.5 ms traced
on this CPU), so the trace overstates the matmuls' share.

    XLA_FLAGS= python bench/profile_step.py --components

times the step's pieces instead, untraced (jitted alone, min of 10 calls): each tower's
forward and forward + backward, and one encoder block's parts (MLP, attention, layer
norm, the whole block) at the text tower's shape; with `.bench-venv` present, open_clip's
same pieces run in the same call (bench/openclip_step.py --components) and the table
puts them side by side.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time

import common  # noqa: F401  (bench/ on sys.path; sets ROOT)

common.use_one_device()

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

import step_time  # noqa: E402
from vlpre import train_state  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "configs/clip.py:tiny", "config[:arg]")
_BATCH = step_time._BATCH  # --batch_size, shared with step_time's flags  # pylint: disable=protected-access
_TEXT_LEN = flags.DEFINE_integer("text_len", 77, "text tokens")
_STEPS = flags.DEFINE_integer("profile_steps", 2, "traced steps (after 2 untraced ones)")
_SET = flags.DEFINE_multi_string("set", [], "config override key=value (python literal)")
_TOP = flags.DEFINE_integer("top", 12, "rows of the per-module table")
_COMPONENTS = flags.DEFINE_boolean(
    "components", False, "time the step's pieces untraced, beside open_clip's, instead of a trace")

_SKIP = ("ThunkExecutor", "SlinkyThreadPool", "ParallelLoop", "Execute")


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name → its op_name metadata (the JAX/Flax source of the op)."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"",
                       hlo_text, re.M):
    out[m.group(1)] = m.group(2)
  return out


def classify(op_name: str) -> tuple[str, str, str]:
  """(direction, tower, part) of an op from its op_name."""
  if "transpose(" in op_name:
    direction = "backward"
  elif "jvp(" in op_name:
    direction = "forward"
  else:
    direction = "update"  # optimizer, grad norms, metrics
  tower = "image" if "/img" in op_name else "text" if "/txt" in op_name else "-"
  for key, part in (("/attn/", "attention"), ("/mlp/", "mlp"), ("ln_", "layernorm"),
                    ("/map_head/", "map head"), ("token_embed", "token embedding"),
                    ("patch_embed", "patch embedding"), ("_head", "projection head"),
                    ("/encoder/", "encoder (residual, scan)")):
    if key in op_name:
      return direction, tower, part
  if direction == "update":
    return direction, tower, "optimizer / norms"
  return direction, tower, "loss / other"


def kind_of(instruction: str, op_name: str) -> str:
  base = re.sub(r"\.\d+$", "", instruction)
  if "dot_general" in op_name or base.startswith("ynn_fusion") or base.startswith("dot"):
    return "matmul"
  for key in ("softmax", "exp", "reduce_max", "logistic", "tanh", "erf", "rsqrt", "integer_pow",
              "scatter", "gather", "dynamic_slice", "dynamic_update_slice", "transpose", "copy"):
    if key in op_name.split("/")[-1] or base.startswith(key):
      return key
  return base.split("_")[0] if base else "other"


def profile(config, batch, steps: int) -> dict:
  s = train_state.setup(config, batch)
  dbatch = s.device_batch(batch)
  rng = jax.random.key(0)
  compiled = s.jit_train_step().lower(s.state, s.frozen, dbatch, rng).compile()
  names = op_names(compiled.as_text())
  state = s.state
  for _ in range(2):
    state, metrics = compiled(state, s.frozen, dbatch, rng)
    jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      state, metrics = compiled(state, s.frozen, dbatch, rng)
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - start) / steps
    path = sorted(glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    by_op: collections.Counter = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        if not line.name.startswith("tf_XLA"):
          continue
        for event in line.events:
          if not event.name.startswith(_SKIP):
            by_op[event.name] += event.duration_ns / 1e9 / steps
  by_part: collections.Counter = collections.Counter()
  by_kind: collections.Counter = collections.Counter()
  by_direction: collections.Counter = collections.Counter()
  for op, seconds in by_op.items():
    op_name = names.get(op, "")
    direction, tower, part = classify(op_name)
    by_part[(tower, part, direction)] += seconds
    by_kind[kind_of(op, op_name)] += seconds
    by_direction[direction] += seconds
  return {"wall": wall, "total": sum(by_op.values()), "by_part": by_part, "by_kind": by_kind,
          "by_direction": by_direction, "by_op": by_op, "names": names}


def min_ms(fn, *args, calls: int = 10) -> float:
  """Minimum wall time of a jitted call over `calls` calls (after one compiling call), ms."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def components(config, batch) -> dict[str, float]:
  """ms of the CLIP step's pieces: towers forward / forward + backward (gradient of every
  parameter, the embedding's included), and one encoder block's parts at the text
  tower's shape [B, L, D], forward / forward + backward (parameters and input)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vlpre.nn import layers  # pylint: disable=g-import-not-at-top
  s = train_state.setup(config, batch)
  model, params = s.model, s.variables()["params"]
  image, text = jnp.asarray(batch["image"]), jnp.asarray(batch["text"])
  mask = jnp.asarray(batch["text_mask"])

  def image_sum(p):
    return model.apply({"params": p}, image, True, method=model.embed_image)["zimg"].sum()

  def text_sum(p):
    return model.apply({"params": p}, text, mask, True, method=model.embed_text).sum()

  out = {"image tower": (min_ms(image_sum, params), min_ms(jax.grad(image_sum), params)),
         "text tower": (min_ms(text_sum, params), min_ms(jax.grad(text_sum), params))}
  t = config.model.text
  x = jax.random.normal(jax.random.key(0), (*text.shape, t.width))
  parts = {"block: MLP": (layers.MlpBlock(t.mlp_dim), {"train": True}),
           "block: causal attention": (layers.Attention(t.num_heads, causal=True), {}),
           "block: layer norm": (layers.layer_norm(jnp.float32), {}),
           "whole block (pre-LN, causal)": (layers.EncoderBlock(t.num_heads, t.mlp_dim,
                                                                causal=True), {})}
  for name, (module, kwargs) in parts.items():
    variables = module.init(jax.random.key(1), x, **kwargs)

    def forward(v, x, module=module, kwargs=kwargs):
      y = module.apply(v, x, **kwargs)
      return y[0] if isinstance(y, tuple) else y

    def weighted_sum(v, x, forward=forward):
      return (forward(v, x) * x).sum()

    out[name] = (min_ms(forward, variables, x),
                 min_ms(jax.grad(weighted_sum, argnums=(0, 1)), variables, x))
  return out


def openclip_components(batch_size: int, text_len: int) -> dict[str, tuple[float, float]]:
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  python = step_time._OPENCLIP_PYTHON.value  # pylint: disable=protected-access
  if not os.path.exists(python):
    print(f"no open_clip Python at {python}: open_clip column skipped (make bench-venv)")
    return {}
  out = subprocess.run([python, os.path.join(common.ROOT, "bench", "openclip_step.py"),
                        "--components", f"--batch_size={batch_size}", f"--text_len={text_len}"],
                       capture_output=True, text=True, check=True)
  return {k: tuple(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def print_components(ours: dict, theirs: dict) -> None:
  print("\n| piece | vlpre fwd ms | vlpre fwd+bwd ms | open_clip fwd ms | open_clip fwd+bwd ms "
        "| fwd+bwd ratio |\n|---|---|---|---|---|---|")
  for name, (fwd, both) in ours.items():
    o_fwd, o_both = theirs.get(name, (float("nan"), float("nan")))
    print(f"| {name} | {fwd:.1f} | {both:.1f} | {o_fwd:.1f} | {o_both:.1f} | "
          f"{both / o_both:.2f} |")


def main(argv):
  del argv
  overrides = {"batch_size": _BATCH.value}
  for item in _SET.value:
    key, _, value = item.partition("=")
    import ast  # pylint: disable=g-import-not-at-top
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  config = step_time.load_config(_CONFIG.value, overrides)
  batch = step_time.synthetic_batch(config, _BATCH.value, _TEXT_LEN.value, None)
  if _COMPONENTS.value:
    ours = components(config, batch)
    print_components(ours, openclip_components(_BATCH.value, _TEXT_LEN.value))
    return
  r = profile(config, batch, _STEPS.value)
  total = r["total"]
  print(f"\n{_CONFIG.value} batch {_BATCH.value}, {_TEXT_LEN.value} tokens, overrides "
        f"{overrides}: {r['wall']:.3f} s/step under the profiler; op time summed over "
        f"threads {total:.3f} s\n")
  print("| tower | part | direction | s/step (op time) | share |\n|---|---|---|---|---|")
  for (tower, part, direction), sec in r["by_part"].most_common(_TOP.value):
    print(f"| {tower} | {part} | {direction} | {sec:.3f} | {100 * sec / total:.1f}% |")
  print("\n| direction | share |\n|---|---|")
  for direction, sec in r["by_direction"].most_common():
    print(f"| {direction} | {100 * sec / total:.1f}% |")
  print("\n| op kind | s/step (op time) | share |\n|---|---|---|")
  for kind, sec in r["by_kind"].most_common(10):
    print(f"| {kind} | {sec:.3f} | {100 * sec / total:.1f}% |")
  print("\nslowest ops:")
  for op, sec in r["by_op"].most_common(8):
    print(f"  {op}: {sec:.3f} s  {r['names'].get(op, '?')[:150]}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
