"""LiT: CLIP with the image tower locked (loaded from a trained checkpoint), text side trained.

The image tower comes from a vlpre workdir (`init_from.workdir`, e.g. a CLIP run); every
`img/...` and `img_head/...` weight is frozen by the regexes in `frozen`.

Launch:   python -m vlpre.main --config=configs/lit.py --config.init_from.workdir=PRETRAINED_DIR --workdir=DIR
Tiny CPU: python -m vlpre.main --config=configs/lit.py:tiny --config.init_from.workdir=workdirs/clip_tiny --workdir=workdirs/lit_tiny
"""
from vlpre import config_lib


def get_config(arg=None):
  c = config_lib.base(arg)
  c.input = config_lib.image_input(arg)
  c.tokenizer = dict(name="clip_bpe")
  c.model_name = "two_tower"
  c.model = dict(image=config_lib.vit(arg, pool="cls"), text=config_lib.text_tower(arg),
                 embed_dim=256 if arg == "tiny" else 512)
  # Weights copied from another vlpre run's latest checkpoint before training starts.
  c.init_from = dict(workdir="", prefixes=("img", "img_head"))
  c.frozen = ("img/.*", "img_head/.*")
  c.losses = {"clip": 1.0}
  c.evals = config_lib.standard_evals(arg)
  return c
