"""Text embedder: tunes the packaged SmolLM2-135M into a text embedder (InfoNCE over pairs
of captions of one Flickr8k training image; the images are never read), then saves it as
a text-encoder recipe that LIFT, vlpre.embed and text_score load by name:
  python -m vlpre.main --config=configs/text_embedder.py:tiny,long --workdir=workdirs/text_embedder_long
  python -m vlpre.methods.text_embedder.save --config=configs/text_embedder.py:tiny,long \
      --workdir=workdirs/text_embedder_long
  python -m vlpre.methods.lift.text_score --config=configs/lift.py:tiny,tuned
  python -m vlpre.embed --config=configs/lift.py:tiny,tuned --workdir=workdirs/lift_tuned
  python -m vlpre.main  --config=configs/lift.py:tiny,tuned --workdir=workdirs/lift_tuned

`tiny,long` is the run behind the recipe LIFT's `tuned` loads, a GPU job (600 steps of 128
pairs, 13 epochs of Flickr8k train: 3 min on one H200 shared with three other runs, ~100 s a
step on 2 CPU cores).
On a CPU, `:tiny` alone (24 steps of 32 pairs, ~11 min) saves `smollm2-flickr8k`:
--config.text_encoder.name=smollm2-flickr8k on `lift.py:tiny,tuned`.

Arguments (comma-separated, e.g. `:tiny,last4,bidir`): `tiny`; `long` (above); what trains: `lora`
(default: rank-8 adapters on every attention and MLP projection), `last4` (the last 4 of
SmolLM2's 30 layers and the final norm, a layer group of their own) or `full`; `bidir`:
bidirectional attention (LLM2Vec); `mean`: mean pooling over the caption (no template)
instead of the PromptEOL template's last token; `hardneg`: one lexical hard negative per
pair. Each choice changes the recipe name (`text_embedder.recipe`), so variants never
overwrite each other's recipe.
"""
from vlpre import config_lib
from vlpre import llm as llm_lib
from vlpre.methods.text_embedder import data

PROMPTEOL = 'This sentence : "{text}" means in one word:"'
SMOLLM2_LAYERS = 30
TRAIN_MODES = ("lora", "last4", "full")
OPTIONS = ("tiny", "long", "bidir", "mean", "hardneg", *TRAIN_MODES)


def get_config(arg=None):
  """arg: see the module docstring."""
  parts = [p for p in (arg or "").split(",") if p]
  unknown = sorted(set(parts) - set(OPTIONS))
  if unknown:
    raise ValueError(f"configs/text_embedder.py: unknown arguments {unknown}; use {OPTIONS}")
  modes = [p for p in parts if p in TRAIN_MODES]
  if len(modes) > 1:
    raise ValueError(f"configs/text_embedder.py: pick one of {TRAIN_MODES}, got {modes}")
  tiny, mode = "tiny" in parts, (modes or ["lora"])[0]
  bidir, mean = "bidir" in parts, "mean" in parts
  c = config_lib.base("tiny" if tiny else None)
  last = 4  # layers trained by `last4`: their own scanned group, so a regex selects them
  c.llm = llm_lib.config_section(
      "smollm2-135m", causal=not bidir,
      layer_groups=(SMOLLM2_LAYERS - last, last) if mode == "last4" else (),
      remat="none" if tiny else "dots_no_batch")
  c.text_embedder = dict(
      template="{text}" if mean else PROMPTEOL,  # where the caption goes
      pooling="mean" if mean else "last",  # last: the template's own last token (PromptEOL)
      append_eos=False,     # end texts with EOS (a plain last-token embedder without template)
      lora_rank=8 if mode == "lora" else 0,  # adapters on q/k/v/o/gate/up/down; 0: none
      lora_alpha=16.0,      # adapter scale alpha / rank
      temperature=0.05,     # InfoNCE temperature (SimCSE, E5)
      # The saved recipe's name (vlpre.text_encoders.recipes), one per variant.
      recipe="smollm2-flickr8k" + "".join(f"-{p}" for p in parts if p != "tiny"))
  c.input = data.input_config(max_text_len=40 if tiny else 64, hard_negatives="hardneg" in parts)
  c.model_name = "text_embedder"
  c.model = dict()
  c.losses = {"pair_infonce": 1.0}
  backbone = "encoder/backbone"
  if mode == "lora":
    c.trainable = (".*/lora_[ab]",)  # adapters only: the base weights stay frozen
  elif mode == "last4":
    c.trainable = (f"{backbone}/layers_{SMOLLM2_LAYERS - last}to{SMOLLM2_LAYERS - 1}/.*",
                   f"{backbone}/norm/.*")
  c.optim.update(lr=(1e-3 if mode == "lora" else 2e-5) if tiny else (5e-4 if mode == "lora" else 1e-5),
                 weight_decay=0.0, warmup_steps=5 if tiny else 100, b2=0.999)
  c.batch_size = 32 if tiny else 512  # caption pairs per step (2 or 3 texts each)
  c.total_steps = 24 if tiny else 2_000  # tiny: ~11 min on 2 cores (README)
  c.log_every = 5 if tiny else 50
  c.checkpoint.every_steps = 24 if tiny else 500
  if "long" in parts:  # the tuning behind the `tuned` recipe (README: text side)
    c.batch_size, c.total_steps, c.log_every = 128, 600, 50
    c.optim.update(lr=5e-4 if mode == "lora" else 1e-5, warmup_steps=30)
    c.checkpoint.every_steps = 100
  c.evals = {}  # the text side is scored after saving: vlpre.methods.lift.text_score
  return c
