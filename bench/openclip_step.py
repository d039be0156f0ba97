"""open_clip reference step times for bench/step_time.py (runs in the PyTorch bench venv).

    .bench-venv/bin/python bench/openclip_step.py --mode=clip --text_len=77

Builds open_clip's CLIP with the BASELINES.md tiny config (ViT 64 px / patch 8 / width
192 / 12 layers / 3 heads; text width 192 / 12 layers / 3 heads; embed 256; AdamW) and
prints one JSON line: median seconds per step over random data. `--mode=image_only`
trains the image tower alone against fixed 576-d targets (what LIFT's cached step does).
`--profile` also runs one step under torch.profiler and prints each op's self CPU time
summed by kind (matmul, attention, layer norm, GELU, optimizer, ...), to set beside
bench/profile_step.py's table of vlpre's step.
"""
import argparse
import json
import statistics
import time

import torch
from open_clip import loss as oc_loss
from open_clip import model as oc_model


# torch op name → kind, first match wins (aten names as the profiler reports them).
_KINDS = (("loss", ("cross_entropy", "log_softmax", "nll_loss")),
          ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention",
                         "softmax", "bmm", "baddbmm")),
          ("matmul", ("addmm", "mm", "matmul", "linear", "conv")),
          ("layernorm", ("layer_norm",)),
          ("gelu", ("gelu",)),
          ("optimizer", ("_foreach", "adamw", "lerp", "addcdiv", "addcmul")),
          ("copy / transpose", ("copy_", "clone", "contiguous", "transpose", "permute",
                                "_to_copy", "cat", "stack")))


def kind_of(name: str) -> str:
  name = name.lower().replace("aten::", "")
  for kind, keys in _KINDS:
    if any(k in name for k in keys):
      return kind
  return "other (elementwise, reductions, loss)"


def profile_step(opt, loss_fn):
  """One step under torch.profiler: self CPU time per op kind, summed over threads."""
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()
  by_kind: dict = {}
  total = 0.0
  for event in prof.key_averages():
    seconds = event.self_cpu_time_total / 1e6
    by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + seconds
    total += seconds
  print(f"| op kind (open_clip, torch.profiler self CPU time) | s/step | share |\n|---|---|---|")
  for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f"| {kind} | {seconds:.3f} | {100 * seconds / total:.1f}% |")
  print("\nslowest ops:")
  for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]:
    print(f"  {event.key}: {event.self_cpu_time_total / 1e6:.3f} s ({event.count} calls)")


def min_ms(fn, calls: int = 10) -> float:
  fn()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def components(vision, text, images, batch_size: int, text_len: int) -> dict:
  """ms, (forward, forward + backward), of the same pieces bench/profile_step.py
  --components times in vlpre: the towers, and one block's parts at the text shape."""
  from open_clip.transformer import ResidualAttentionBlock  # pylint: disable=g-import-not-at-top
  model = oc_model.CLIP(embed_dim=256, vision_cfg=vision, text_cfg=text, output_dict=True)
  tokens = torch.randint(1, 49406, (batch_size, text_len))

  def timed(forward, params, x=None):
    with torch.no_grad():
      fwd = min_ms(forward)

    def both():
      for p in params:
        p.grad = None
      if x is not None:
        x.grad = None
      out = forward()
      (out * x).sum().backward() if x is not None else out.sum().backward()
    return fwd, min_ms(both)

  out = {"image tower": timed(lambda: model.encode_image(images), list(model.parameters())),
         "text tower": timed(lambda: model.encode_text(tokens), list(model.parameters()))}
  width, heads = text.width, text.heads
  x = torch.randn(batch_size, text_len, width, requires_grad=True)
  causal = torch.full((text_len, text_len), float("-inf")).triu(1)
  mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                            torch.nn.Linear(4 * width, width))
  attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
  norm = torch.nn.LayerNorm(width)
  block = ResidualAttentionBlock(width, heads, batch_first=True)
  parts = {"block: MLP": (lambda: mlp(x), mlp),
           "block: causal attention": (lambda: attn(x, x, x, need_weights=False,
                                                    attn_mask=causal)[0], attn),
           "block: layer norm": (lambda: norm(x), norm),
           "whole block (pre-LN, causal)": (lambda: block(x, attn_mask=causal), block)}
  for name, (forward, module) in parts.items():
    out[name] = timed(forward, list(module.parameters()), x)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=["clip", "image_only"], default="clip")
  parser.add_argument("--text_len", type=int, default=77)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--profile", action="store_true", help="torch.profiler op table")
  parser.add_argument("--components", action="store_true",
                      help="time the towers and one block's parts (bench/profile_step.py)")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  vision = oc_model.CLIPVisionCfg(layers=12, width=192, head_width=64, patch_size=8, image_size=64)
  text = oc_model.CLIPTextCfg(context_length=args.text_len, vocab_size=49408, width=192, heads=3,
                              layers=12)
  images = torch.randn(args.batch_size, 3, 64, 64)
  if args.components:
    print(json.dumps(components(vision, text, images, args.batch_size, args.text_len)))
    return
  criterion = oc_loss.ClipLoss()
  if args.mode == "clip":
    model = oc_model.CLIP(embed_dim=256, vision_cfg=vision, text_cfg=text, output_dict=True)
    tokens = torch.randint(1, 49406, (args.batch_size, args.text_len))

    def loss_fn():
      out = model(images, tokens)
      return criterion(out["image_features"], out["text_features"], out["logit_scale"])
  else:
    model = oc_model._build_vision_tower(576, vision)  # pylint: disable=protected-access
    scale = torch.nn.Parameter(torch.tensor(2.659))
    model.register_parameter("logit_scale", scale)
    targets = torch.nn.functional.normalize(torch.randn(args.batch_size, 576), dim=-1)

    def loss_fn():
      feats = torch.nn.functional.normalize(model(images), dim=-1)
      return criterion(feats, targets, scale.exp())

  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
  times = []
  for i in range(args.steps + 2):
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()
    if i >= 2:
      times.append(time.perf_counter() - start)
  if args.profile:
    profile_step(opt, loss_fn)
  print(json.dumps({"mode": args.mode, "text_len": args.text_len,
                    "seconds": statistics.median(times), "torch": torch.__version__}))


if __name__ == "__main__":
  main()
