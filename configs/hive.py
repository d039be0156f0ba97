"""HIVE: hierarchical ViT→LLM cross-attention pre-training of vision encoders (arXiv 2604.00086).

A captioner (ViT + the packaged SmolLM2) trained in three stages on Flickr8k captions;
what it leaves behind is the ViT. Tiny CPU run, the ViT from the tiny LIFT run:
  python -m vlpre.main --config=configs/hive.py:tiny \
      --config.init_from.workdir=workdirs/lift --workdir=workdirs/hive_tiny
The SA baseline (final ViT features fed at the LLM input), same data and steps:
  python -m vlpre.main --config=configs/hive.py:tiny,mode=sa \
      --config.init_from.workdir=workdirs/lift --workdir=workdirs/hive_sa_tiny
Without init_from, the ViT starts from scratch. The stages (vlpre/stages.py) run in
`<workdir>/0_projectors`, `1_llm`, `2_all`; evaluators with at_start run before stage 1
(the encoder before HIVE), the rest after stage 3.
Options after the variant, comma-separated: mode=hive|sa, pool=<the ViT's pooling>
(match the run the ViT comes from: LIFT's tiny tower uses mean, CLIP's cls),
stage_steps=N or N/N/N (the stages' steps; `make compare` sets it from HIVE_STAGE_STEPS).
"""
import ml_collections as mlc

from vlpre import config_lib
from vlpre import llm as llm_lib


def get_config(arg=None):
  variant, opts = config_lib.parse_arg(arg, {"mode": ("hive", "sa"), "pool": None,
                                             "stage_steps": None})
  tiny = variant == "tiny"
  size = "tiny" if tiny else None
  c = config_lib.base(size)
  c.input = config_lib.image_input(size, max_text_len=32 if tiny else 64)
  c.model_name = "hive"
  c.model = dict(image=config_lib.vit(size, pool=opts.get("pool", "mean")))
  c.hive = dict(
      # The LLM (vlpre.llm.SECTION: name, revision, dtype, layer_groups, remat, num_layers...).
      llm=llm_lib.config_section("smollm2-135m"),  # the paper: MobileLLM-600M
      mode=opts.get("mode", "hive"),  # hive | sa (the LLaVA-style baseline)
      # (ViT block → LLM layer), 1-based; each pair has its own projector and image K/V.
      pairs=((3, 8), (6, 16), (9, 24), (12, 30)),
      bos_id=-1)            # the caption's first input token (-1: the LLM's BOS)
  c.losses = {"lm": 1.0}  # next-token loss on the caption (and EOS) only
  # The ViT from another vlpre run (its `img` tower), or from scratch when workdir is "".
  c.init_from = dict(workdir="", prefixes=("img",))
  c.batch_size = 32 if tiny else 256
  steps = (100, 100, 100) if tiny else (5_000, 20_000, 20_000)
  if "stage_steps" in opts:  # e.g. stage_steps=30 (each stage) or stage_steps=60/30/10
    given = [int(n) if n.isdigit() else 0 for n in opts["stage_steps"].split("/")]
    if len(given) not in (1, 3) or min(given) < 1:
      raise ValueError(f"stage_steps must be N or N/N/N (steps of the three stages), got "
                       f"{opts['stage_steps']!r}")
    steps = tuple(given * 3) if len(given) == 1 else tuple(given)
  c.total_steps = sum(steps)  # the stages' steps decide; this is their sum, for reference
  c.stages = (
      dict(name="projectors", steps=steps[0], trainable=("proj_.*",),
           optim=dict(lr=1e-3, warmup_steps=10 if tiny else 500)),
      dict(name="llm", steps=steps[1], trainable=("proj_.*", "llm/.*"),
           optim=dict(lr=5e-5, warmup_steps=10 if tiny else 500)),
      dict(name="all", steps=steps[2], frozen=(),
           optim=dict(lr=5e-6, warmup_steps=10 if tiny else 500, grad_clip_norm=1.0)),
  )
  c.optim.update(weight_decay=0.0)
  image = dict(image_size=c.input.image_size, resize_size=c.input.image_size,
               batch_size=100 if tiny else 1024)
  c.evals = mlc.ConfigDict(dict(
      captioning=dict(kind="captioning", data="flickr8k/val-*.tar", max_new_tokens=24,
                      max_examples=200 if tiny else 0, **image),
      linear_probe=dict(kind="linear_probe", num_classes=10, train_data="cifar10/train-*.tar",
                        test_data="cifar10/test-*.tar", max_train_examples=5000 if tiny else 0,
                        max_examples=2000 if tiny else 0, at_start=True, **image),
      attentive_probe=dict(kind="attentive_probe", num_classes=10,
                           train_data="cifar10/train-*.tar", test_data="cifar10/test-*.tar",
                           max_train_examples=5000 if tiny else 0,
                           max_examples=2000 if tiny else 0, at_start=True, **image),
  ))
  return c
