"""open_clip reference step times for bench/step_time.py (runs in the PyTorch bench venv).

    .bench-venv/bin/python bench/openclip_step.py --mode=clip --text_len=77

Builds open_clip's CLIP with the BASELINES.md tiny config (ViT 64 px / patch 8 / width
192 / 12 layers / 3 heads; text width 192 / 12 layers / 3 heads; embed 256; AdamW) and
prints one JSON line: median seconds per step over random data. `--mode=image_only`
trains the image tower alone against fixed 576-d targets (what LIFT's cached step does).
"""
import argparse
import json
import statistics
import time

import torch
from open_clip import loss as oc_loss
from open_clip import model as oc_model


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=["clip", "image_only"], default="clip")
  parser.add_argument("--text_len", type=int, default=77)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  vision = oc_model.CLIPVisionCfg(layers=12, width=192, head_width=64, patch_size=8, image_size=64)
  text = oc_model.CLIPTextCfg(context_length=args.text_len, vocab_size=49408, width=192, heads=3,
                              layers=12)
  images = torch.randn(args.batch_size, 3, 64, 64)
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
  print(json.dumps({"mode": args.mode, "text_len": args.text_len,
                    "seconds": statistics.median(times), "torch": torch.__version__}))


if __name__ == "__main__":
  main()
