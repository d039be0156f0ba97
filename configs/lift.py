"""LIFT: the image tower learns to match a FROZEN LLM text embedder (arXiv 2506.04209).

The headline command (packaged SmolLM2-135M, bundled Flickr8k, evaluations included):
  python -m vlpre.main --config=configs/lift.py:tiny --workdir=workdirs/lift
Cached text embeddings (compute them once, then the step never runs the LLM):
  python -m vlpre.embed --config=configs/lift.py:tiny --config.text_mode=cached
  python -m vlpre.main  --config=configs/lift.py:tiny --config.text_mode=cached --workdir=workdirs/lift_cached
Other encoder (all-MiniLM-L6-v2, mean pooled):
  python -m vlpre.main --config=configs/lift.py:tiny --config.text_encoder.name=minilm-l6 --workdir=workdirs/lift_minilm
Full size on a TPU pod / GPU node (ViT-B/16, 224 px; see the 7B preset below):
  python -m vlpre.main --config=configs/lift.py --workdir=gs://BUCKET/lift_b16
"""
from vlpre import config_lib


def get_config(arg=None):
  tiny = arg == "tiny"
  c = config_lib.base(arg)
  c.text_encoder = dict(
      name="smollm2-135m",  # smollm2-135m | minilm-l6 | a HF hub name or local folder
      max_len=77,           # the paper: 77 for alt-text, ~320 for long synthetic captions
      pooling="",           # "" = the encoder's native pooling (last token / mean)
      normalize=True,
      template="{text}",    # where the caption goes; "{text}" = alone (LIFT: no instruction)
      layer=-1,             # decoders: -1 = last layer (normed), k = after k blocks
      center=False,         # subtract the caption store's mean (needs `python -m vlpre.embed`)
      dtype="float32" if tiny else "bfloat16")
  # A 7B-class embedder (Mistral architecture, NV-Embed-v2-like), sharded over fsdp:
  #   c.text_encoder.name = "/path/to/nv-embed-v2"   # HF folder, safetensors
  #   c.text_encoder.max_len = 77
  #   c.mesh = (("data", -1), ("fsdp", 8), ("tensor", 1))
  #   c.batch_size = 16_384
  c.text_mode = "online"  # online: LLM inside the jitted step | cached: join a precomputed store
  c.text_cache = ""  # "" = workdirs/embeddings/<encoder>-L<max_len>-<hash of settings+data>
  c.input = config_lib.image_input(arg)
  c.model_name = "lift"
  c.model = dict(image=config_lib.vit(arg, pool="mean"),
                 head_hidden=None)  # None: the text embedding dim (paper: 4096 → 4096)
  c.frozen = ("txt_encoder/.*", "txt_mean")
  c.losses = {"clip": 1.0}  # or {"cosine": 1.0}: LIFT's simplistic_cos variant
  if not tiny:
    c.optim.update(lr=1e-3, weight_decay=0.2, warmup_steps=500)
    c.batch_size = 16_384
  c.evals = config_lib.standard_evals(arg)
  return c
