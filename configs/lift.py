"""LIFT: the image tower learns to match a FROZEN LLM text embedder (arXiv 2506.04209).

The headline run (packaged SmolLM2-135M with the PromptEOL recipe, bundled Flickr8k,
evaluations included): embed the training captions once, then train the image tower
against them (the step never runs the LLM):
  python -m vlpre.embed --config=configs/lift.py:tiny --workdir=workdirs/lift
  python -m vlpre.main  --config=configs/lift.py:tiny --workdir=workdirs/lift
The LLM inside the jitted step instead (centring still reads the store's mean):
  python -m vlpre.main --config=configs/lift.py:tiny --config.text_mode=online --workdir=workdirs/lift_online
Other encoder (all-MiniLM-L6-v2, mean pooled, its own recipe):
  python -m vlpre.embed --config=configs/lift.py:tiny,minilm --workdir=workdirs/lift_minilm
  python -m vlpre.main  --config=configs/lift.py:tiny,minilm --workdir=workdirs/lift_minilm
Score the text side alone first (caption↔caption retrieval on Flickr8k val):
  python -m vlpre.methods.lift.text_score --config=configs/lift.py:tiny
Against SmolLM2 tuned into an embedder first (configs/text_embedder.py's commands):
  python -m vlpre.embed --config=configs/lift.py:tiny,tuned --workdir=workdirs/lift_tuned
  python -m vlpre.main  --config=configs/lift.py:tiny,tuned --workdir=workdirs/lift_tuned
Full size on a TPU pod / GPU node (ViT-B/16, 224 px; see the 7B preset below):
  python -m vlpre.main --config=configs/lift.py --workdir=gs://BUCKET/lift_b16
"""
from vlpre import config_lib


# Text-embedding recipes, the best found per encoder by caption↔caption retrieval on
# Flickr8k val (vlpre/methods/lift/text_recipes.py; its README "Text side alone"). A plain decoder's last
# token after the caption is a poor sentence embedding (R@1 7.3 for SmolLM2); asking for
# the meaning "in one word" and reading the prompt's own last token is far better (40.6).
PROMPTEOL = 'This sentence : "{text}" means in one word:"'
RECIPES = {
    "smollm2": dict(name="smollm2-135m", template=PROMPTEOL, pooling="", layer=-1, center=True),
    "minilm": dict(name="minilm-l6", template="{text}", pooling="", layer=-1, center=False),
    # SmolLM2 tuned into an embedder by configs/text_embedder.py:tiny,long (a saved recipe:
    # its template, pooling and attention come with it; vlpre.text_encoders.recipes). The
    # 24-step CPU recipe of `text_embedder.py:tiny` is --config.text_encoder.name=smollm2-flickr8k.
    "tuned": dict(name="smollm2-flickr8k-long", template="", pooling="", layer=-1, center=False),
}


def get_config(arg=None):
  """arg: "tiny" and/or an encoder recipe of RECIPES, comma-separated ("tiny,minilm");
  "hard_negatives" adds the SugarCrepe-format evaluator built from Flickr8k val."""
  parts = [p for p in (arg or "").split(",") if p]
  unknown = set(parts) - {"tiny", "hard_negatives", *RECIPES}
  if unknown:
    raise ValueError(f"configs/lift.py: unknown arguments {sorted(unknown)}; "
                     f"use tiny, hard_negatives and/or one of {sorted(RECIPES)}")
  tiny = "tiny" in parts
  recipe = RECIPES[next((p for p in parts if p in RECIPES), "smollm2")]
  c = config_lib.base("tiny" if tiny else None)
  c.text_encoder = dict(
      name=recipe["name"],  # smollm2-135m | minilm-l6 | a HF hub name or local folder
      max_len=77,           # the paper: 77 for alt-text, ~320 for long synthetic captions
      pooling=recipe["pooling"],  # "" = the encoder's native pooling (last token / mean)
      normalize=True,
      template=recipe["template"],  # where the caption goes; "{text}" = alone, no EOS after
      # ("" = the encoder's own: a tuned recipe's template, else the text alone)
      layer=recipe["layer"],        # decoders: -1 = last layer (normed), k = after k blocks
      center=recipe["center"],      # subtract the caption store's mean (python -m vlpre.embed)
      dtype="float32" if tiny else "bfloat16")
  # A 7B-class embedder (Mistral architecture, NV-Embed-v2-like), sharded over fsdp:
  #   c.text_encoder.name = "/path/to/nv-embed-v2"   # HF folder, safetensors
  #   c.text_encoder.max_len = 77
  #   c.mesh = (("data", -1), ("fsdp", 8), ("tensor", 1))
  #   c.batch_size = 16_384
  c.text_mode = "cached"  # cached: join the store of `python -m vlpre.embed` | online: LLM in the step
  c.text_cache = ""  # "" = <workdir>/embeddings/<encoder>-L<max_len>-<hash of settings+data>
                     # (vlpre.embed --workdir=the run's); or a folder every host sees
  c.input = config_lib.image_input("tiny" if tiny else None)
  c.model_name = "lift"
  c.model = dict(image=config_lib.vit("tiny" if tiny else None, pool="mean"),
                 head_hidden=None)  # None: the text embedding dim (paper: 4096 → 4096)
  c.frozen = ("txt_encoder/.*", "txt_mean")
  c.losses = {"clip": 1.0}  # or {"cosine": 1.0}: LIFT's simplistic_cos variant
  if not tiny:
    c.optim.update(lr=1e-3, weight_decay=0.2, warmup_steps=500)
    c.batch_size = 16_384
  c.evals = config_lib.standard_evals("tiny" if tiny else None,
                                      hard_negatives="hard_negatives" in parts)
  return c
