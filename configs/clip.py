"""CLIP: image and text towers trained from scratch with the symmetric InfoNCE loss.

Launch (TPU VM / GPU):
  python -m vlpre.main --config=configs/clip.py --workdir=gs://BUCKET/clip_b16
Tiny CPU run (BASELINES.md config, Flickr8k, ~minutes per 100 steps on 2 cores):
  python -m vlpre.main --config=configs/clip.py:tiny --workdir=workdirs/clip_tiny
With ",hf" (configs/clip.py:hf, :tiny,hf) the towers are OpenAI CLIP's architecture, which
`vlpre.export --format=hf` writes whole as a transformers CLIPModel (or --format=open_clip).
",hard_negatives" adds the SugarCrepe-format evaluator built from Flickr8k val.
"""
from vlpre import config_lib


def get_config(arg=None):
  arg, options = config_lib.parse_arg(arg, {"hf": None, "hard_negatives": None})
  arg = arg or None
  c = config_lib.base(arg)
  c.input = config_lib.image_input(arg)
  c.tokenizer = dict(name="clip_bpe")
  c.model_name = "two_tower"
  c.model = dict(image=config_lib.vit(arg, pool="cls"), text=config_lib.text_tower(arg),
                 embed_dim=256 if arg == "tiny" else 512)
  if "hf" in options:  # vlpre's towers by default: no LayerNorm before the image blocks
    config_lib.public_towers(c.model, "CLIP")
  c.losses = {"clip": 1.0}  # name → weight (vlpre.losses.LOSSES)
  c.evals = config_lib.standard_evals(arg, hard_negatives="hard_negatives" in options)
  return c
