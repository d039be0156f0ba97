"""SigLIP: CLIP's towers with the pairwise sigmoid loss (t = exp(t'), t' init log 10; b init −10).

Launch:   python -m vlpre.main --config=configs/siglip.py --workdir=DIR
Tiny CPU: python -m vlpre.main --config=configs/siglip.py:tiny --workdir=workdirs/siglip_tiny
With ",hf" (configs/siglip.py:hf, :tiny,hf) the towers are SigLIP's public architecture,
which `vlpre.export --format=hf` writes whole as a transformers SiglipModel.
"""
import math

from vlpre import config_lib


def get_config(arg=None):
  arg, options = config_lib.parse_arg(arg, {"hf": None})
  arg = arg or None
  c = config_lib.base(arg)
  c.input = config_lib.image_input(arg)
  c.tokenizer = dict(name="clip_bpe")
  c.model_name = "two_tower"
  c.model = dict(image=config_lib.vit(arg, pool="map"), text=config_lib.text_tower(arg),
                 embed_dim=256 if arg == "tiny" else 512,
                 logit_scale_init=math.log(10.0), logit_bias_init=-10.0, max_logit_scale=1e4)
  if "hf" in options:  # vlpre's towers by default: a causal text tower and an image head
    config_lib.public_towers(c.model, "SigLIP")
  c.losses = {"siglip": 1.0}
  c.evals = config_lib.standard_evals(arg)
  return c
