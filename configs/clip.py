"""CLIP: image and text towers trained from scratch with the symmetric InfoNCE loss.

Launch (TPU VM / GPU):
  python -m vlpre.main --config=configs/clip.py --workdir=gs://BUCKET/clip_b16
Tiny CPU run (BASELINES.md config, Flickr8k, ~minutes per 100 steps on 2 cores):
  python -m vlpre.main --config=configs/clip.py:tiny --workdir=workdirs/clip_tiny
"""
from vlpre import config_lib


def get_config(arg=None):
  c = config_lib.base(arg)
  c.input = config_lib.image_input(arg)
  c.tokenizer = dict(name="clip_bpe")
  c.model_name = "two_tower"
  c.model = dict(image=config_lib.vit(arg, pool="cls"), text=config_lib.text_tower(arg),
                 embed_dim=256 if arg == "tiny" else 512)
  c.losses = {"clip": 1.0}  # name → weight (vlpre.losses.LOSSES)
  c.evals = config_lib.standard_evals(arg)
  return c
