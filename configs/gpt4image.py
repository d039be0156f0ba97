"""GPT4Image: supervised classification + λ·L_text on LLM-written descriptions (arXiv 2306.00693).

Three stages, each resumable (the tiny CPU run: a narrow ResNet-18 on 32 px CIFAR-10):
  python -m vlpre.methods.gpt4image.describe --config=configs/gpt4image.py:tiny   # 1. a description per image
  python -m vlpre.embed    --config=configs/gpt4image.py:tiny   # 2. frozen text embeddings
  python -m vlpre.main     --config=configs/gpt4image.py:tiny --workdir=workdirs/gpt4image_tiny
The CE-only baseline (no descriptions needed):
  python -m vlpre.main --config=configs/gpt4image.py:tiny --config.text_loss_weight=0 \
      --workdir=workdirs/gpt4image_tiny_ce
Other variants: `:tiny_vit` (small ViT, 32 px), `:resnet50` / `:deit_s` (the paper's
ImageNet recipes, 224 px; ImageNet shards made with `python -m vlpre.data.convert`).
Options after the variant, comma-separated: `text_loss=text_byol` (or text_infonce_oneway),
e.g. `--config=configs/gpt4image.py:tiny_vit,text_loss=text_byol`.
The results table: `python -m vlpre.methods.gpt4image.table` (vlpre/methods/gpt4image/README.md).
"""
import ml_collections as mlc

from vlpre import config_lib
from vlpre import llm as llm_lib

VARIANTS = ("tiny_resnet", "tiny_vit", "resnet50", "deit_s")
TEXT_LOSSES = ("text_infonce", "text_infonce_oneway", "text_byol")
_IMAGENET_TRAIN = 1_281_167


def _parse(arg):
  variant, *options = (arg or "resnet50").split(",")
  variant = {"tiny": "tiny_resnet"}.get(variant, variant)
  if variant not in VARIANTS:
    raise ValueError(f"unknown GPT4Image variant {variant!r}; use one of {VARIANTS} (or tiny)")
  opts = dict(o.split("=", 1) for o in options if o)
  unknown = set(opts) - {"text_loss"}
  if unknown:
    raise ValueError(f"unknown options {sorted(unknown)}; known: text_loss")
  text_loss = opts.get("text_loss", "text_infonce")
  if text_loss not in TEXT_LOSSES:
    raise ValueError(f"text_loss must be one of {TEXT_LOSSES}, got {text_loss!r}")
  return variant, text_loss


def get_config(arg=None):
  variant, text_loss = _parse(arg)
  tiny = variant.startswith("tiny")
  cnn = "resnet" in variant
  c = config_lib.base("tiny" if tiny else None)

  # The switch: λ of L = CE + λ·L_text. 0 = the CE-only baseline (no projector, no store).
  c.text_loss_weight = 0.3
  # Loss name → weight; the text term follows text_loss_weight (a 0 weight switches it off).
  c.losses = mlc.ConfigDict({"softmax_ce": 1.0, text_loss: c.get_ref("text_loss_weight")})

  # Stage 1 (vlpre/methods/gpt4image/describe.py): who writes the descriptions.
  c.describe = dict(
      backend="llm-class-prompts" if tiny else "precomputed",  # | precomputed | vlpre-captioner
      output_dir="workdirs/descriptions/" + ("cifar10-smollm2-135m" if tiny else "imagenet"),
      precomputed="",        # backend=precomputed: JSONL of {"key", "description"} (MiniGPT-4)
      # backend=vlpre-captioner: a trained vlpre captioner (e.g. HIVE) writes one caption
      # per training image; its config and run (a staged run: the last stage's export).
      captioner=dict(config="configs/hive.py:tiny", workdir="workdirs/hive_tiny", batch_size=100),
      # backend=llm-class-prompts: the packaged instruct LLM (vlpre.llm.SECTION's shape)
      llm=llm_lib.config_section("smollm2-135m"),
      classnames="cifar10" if tiny else "imagenet",  # folder of classnames.json in data_dir
      per_class=8,           # distinct descriptions per class; an image gets one by key hash
      max_new_tokens=48,
      temperature=0.7,       # sampling: varied but still on-topic for a 135M model
      top_k=50,
      seed=0,
      system="",             # "" = describe.DEFAULT_SYSTEM
      prompts=(),            # () = describe.DEFAULT_PROMPTS ("{}" = the class name)
  )
  # Stage 2 (vlpre/embed.py): the frozen text encoder (paper: CLIP's; here a sentence
  # embedder packaged for offline use), L2-normalised, cached by image key.
  c.text_encoder = dict(name="minilm-l6", max_len=64, pooling="", normalize=True,
                        template="{text}", layer=-1, dtype="float32")
  c.text_cache = ""  # "" = <describe.output_dir>/embeddings/<encoder>-L<max_len>-<hash>

  # Stage 3: the classifier.
  if tiny:
    num_classes, image, resize = 10, 32, 36
    c.input = config_lib.image_input(
        "tiny", train="cifar10/train-*.tar", label=True, num_classes=num_classes, image_size=32,
        resize_size=36, augment="resize_random_crop", flip=True)  # ≈ CIFAR's pad-4 crop + flip
    c.batch_size = 128
    c.total_steps = 250                 # ≈ 3 epochs of the 10k-image subset
    c.checkpoint.every_steps = 1_000
  else:
    num_classes, image, resize = 1000, 224, 256
    c.input = config_lib.image_input(
        None, train="imagenet/train-*.tar", label=True, num_classes=num_classes,
        augment="random_resized_crop", flip=True)
    c.batch_size = 1024
  c.model_name = "classifier"
  if variant == "tiny_resnet":
    # ResNet-18 at 1/8 width (8 → 64 channels): sized so the 12 runs of the README's
    # table take ~20 min on 2 CPU cores. width=64 is the standard CIFAR ResNet-18.
    c.model = dict(backbone="resnet18", width=8, cifar_stem=True)
  elif variant == "tiny_vit":
    # A ViT-Ti-like tower cut down for CPU: 4 blocks of width 128, 8 px patches (16 tokens).
    c.model = dict(backbone="vit", vit=dict(width=128, depth=4, mlp_dim=256, num_heads=4,
                                            patch_size=8, pool="cls"))
  elif variant == "resnet50":
    c.model = dict(backbone="resnet50", width=64, cifar_stem=False)
  else:
    c.model = dict(backbone="vit", vit=dict(variant="S/16", pool="cls"))
  c.model.update(num_classes=num_classes,
                 text_temperature=0.2 if cnn else 0.05,  # the paper's FIXED temperatures
                 label_smoothing=0.0 if tiny or cnn else 0.1,
                 mixup_alpha=0.0 if tiny or cnn else 0.8,
                 cutmix_alpha=0.0 if tiny or cnn else 1.0)

  if cnn:
    # The paper's ResNet recipe: SGD, lr 0.1 × B/256, wd 1e-4, cosine, 120 epochs.
    c.optim = dict(name="sgd", lr=0.1 * c.batch_size / 256, momentum=0.9, nesterov=tiny,
                   weight_decay=5e-4 if tiny else 1e-4,  # CIFAR's usual 5e-4 for the tiny run
                   warmup_steps=30 if tiny else 5 * _IMAGENET_TRAIN // c.batch_size,
                   schedule="cosine", grad_clip_norm=0.0)
    if not tiny:
      c.total_steps = 120 * _IMAGENET_TRAIN // c.batch_size
  else:
    # DeiT's recipe: AdamW, lr 5e-4 × B/512, wd 0.05, 5 warm-up epochs, 300 epochs.
    # (vlpre lacks DeiT's RandAugment, random erasing, repeated augmentation, drop-path.)
    c.optim = dict(name="adamw", lr=(1e-3 if tiny else 5e-4 * c.batch_size / 512), b1=0.9,
                   b2=0.999, eps=1e-8, weight_decay=0.05,
                   warmup_steps=30 if tiny else 5 * _IMAGENET_TRAIN // c.batch_size,
                   schedule="cosine", grad_clip_norm=0.0 if tiny else 1.0)
    if not tiny:
      c.total_steps = 300 * _IMAGENET_TRAIN // c.batch_size
  # ResNets train data-parallel only (25M parameters fit everywhere); ViT may add fsdp.
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))

  size = dict(image_size=image, resize_size=resize, batch_size=500 if tiny else 1024)
  test = "cifar10/test-*.tar" if tiny else "imagenet/val-*.tar"
  c.evals = dict(
      classify=dict(kind="classification", data=test, max_examples=0, every_steps=0, **size),
      linear_probe=dict(kind="linear_probe", num_classes=num_classes, every_steps=0,
                        train_data=c.input.train, test_data=test,
                        max_train_examples=5000 if tiny else 50_000,
                        max_examples=2000 if tiny else 10_000, **size))
  return c
