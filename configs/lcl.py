"""LCL: Latent Compression Learning on interleaved image-text data (arXiv 2406.07543).

A ViT from scratch and a causal model on packed interleaved rows, L = λ·L_con + L_gen
(vlpre/methods/lcl/: model.py, losses.py, data.py; METHODS.md § LCL). The interleaved training
set is built once from Flickr8k train (2-4 consecutive images per document, each followed
by one of its captions; the images stay in the shards):
  python -m vlpre.data.convert --mode=interleaved --pairs='flickr8k/train-*.tar' \
      --out_dir=workdirs/data/flickr8k_interleaved --split=train
which writes workdirs/data/flickr8k_interleaved/train.jsonl (this config's
`input.documents`, resolved beside configs/ so the run may start from anywhere).
Tiny CPU runs (64 px, ViT-Ti/16 → 16 visual tokens, a 4-layer decoder, 16 rows of 128
tokens with up to 4 images each; CLIP's tiny step has 64 images). Interleaved + paired
(half the documents each), then paired only, then with SmolLM2 as the causal model:
  python -m vlpre.main --config=configs/lcl.py:tiny --workdir=workdirs/lcl_tiny
  python -m vlpre.main --config=configs/lcl.py:tiny,paired --workdir=workdirs/lcl_paired_tiny
  python -m vlpre.main --config=configs/lcl.py:tiny,llm=smollm2-135m \
      --workdir=workdirs/lcl_smollm2_tiny
Options after the variant, comma-separated:
  paired               paired data only (input.mix = 1.0): Flickr8k train pairs as 2-element
                       documents, image first with probability 0.5
  contrastive          L_con only;  generation: L_gen only
  llm=smollm2-135m     the causal model is the packaged SmolLM2 (beyond the paper), and
                       its tokenizer (sets lcl.llm.name); `--config.lcl.llm.num_layers=N`
                       keeps its first N layers
λ: `--config.lcl.contrastive_weight=0.3` (linked to losses.lcl_contrastive).
"""
import os

import ml_collections as mlc

from vlpre import config_lib
from vlpre import llm as llm_lib
from vlpre.methods.lcl import data as lcl_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = os.path.join(REPO, "workdirs", "data", "flickr8k_interleaved", "train.jsonl")


def get_config(arg=None):
  variant, opts = config_lib.parse_arg(
      arg, {"paired": None, "contrastive": None, "generation": None, "llm": None})
  if "contrastive" in opts and "generation" in opts:
    raise ValueError("contrastive and generation are exclusive (both: leave them out)")
  tiny = variant == "tiny"
  size = "tiny" if tiny else None
  c = config_lib.base(size)
  image_size, patch = (64, 16) if tiny else (224, 16)
  c.input = lcl_data.input_config(
      documents=DOCUMENTS,            # the convert recipe's output (see the docstring)
      images="flickr8k/train-*.tar",  # where the documents' image keys resolve
      paired="flickr8k/train-*.tar",  # image-caption pairs, wrapped as 2-element documents
      mix=1.0 if "paired" in opts else 0.5,  # share of paired documents (1.0: paired only)
      image_size=image_size, resize_size=72 if tiny else 256,
      augment="resize_random_crop" if tiny else "random_resized_crop",
      context_len=128 if tiny else 280,     # the paper: 128 (B/32), 280 (B/16)
      max_images=4 if tiny else 1,          # at 280 tokens one B/16 image (198 tokens) fits
      visual_tokens=(image_size // patch) ** 2,  # must match the ViT's patches
      num_workers=0 if tiny else 16)
  c.model_name = "lcl"
  vit = dict(variant=f"Ti/{patch}" if tiny else f"B/{patch}", pool="map")  # pool: LCL's
  if not tiny:
    vit["remat"] = True
  c.model = dict(image=vit)
  weight = mlc.FieldReference(0.1)
  c.lcl = dict(
      # The causal model (vlpre.llm.SECTION). name "": (a) from scratch, the paper, whose
      # decoder still takes the section's remat / dtype / scan; "smollm2-135m": (b), whose
      # num_layers keeps the LLM's first N layers (0: all; tests: 2).
      llm=llm_lib.config_section(opts.get("llm", ""),
                                 remat="none" if tiny else "dots_no_batch"),
      # (a): the from-scratch causal model on the CLIP BPE vocabulary + 3 special tokens
      # (the paper: a CLIP-style 12-layer text transformer, width 512).
      decoder=dict(width=192, depth=4, num_heads=3, mlp_dim=768) if tiny else
      dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
      embed_dim=256 if tiny else 512,  # E: the contrastive space
      contrastive_weight=weight)       # λ of L = λ·L_con + L_gen (the paper: 0.1)
  if "contrastive" in opts:
    c.losses = {"lcl_contrastive": 1.0}
  elif "generation" in opts:
    c.losses = {"lcl_generation": 1.0}
  else:
    c.losses = {"lcl_contrastive": weight, "lcl_generation": 1.0}
  c.batch_size = 16 if tiny else 4096  # rows; tiny: ≈ 4 images per row
  if c.lcl.llm.name:  # a pretrained causal model learns slower than one from scratch
    c.optim.update(lr=1e-4 if tiny else 5e-5)
  elif not tiny:
    c.optim.update(lr=3e-4)  # the paper's MMC4 rate
  c.evals = _evals(tiny)
  return c


def _evals(tiny: bool) -> mlc.ConfigDict:
  """Flickr8k val retrieval and zero-shot CIFAR-10 (text through the causal model's <soi>
  projection), linear and attentive probes on CIFAR-10, captioning on Flickr8k val."""
  evals = config_lib.standard_evals("tiny" if tiny else None)
  evals.pop("zeroshot_imagenet_sample")
  size = {k: evals["linear_probe_cifar10"][k] for k in ("image_size", "resize_size", "batch_size")}
  probe_sizes = dict(max_train_examples=5000 if tiny else 0, max_examples=2000 if tiny else 0)
  evals["attentive_probe_cifar10"] = dict(
      kind="attentive_probe", num_classes=10, train_data="cifar10/train-*.tar",
      test_data="cifar10/test-*.tar", num_heads=4, **probe_sizes, **size)
  evals["captioning_flickr8k"] = dict(kind="captioning", data="flickr8k/val-*.tar",
                                      max_new_tokens=24, max_examples=200 if tiny else 0, **size)
  return mlc.ConfigDict(evals)
