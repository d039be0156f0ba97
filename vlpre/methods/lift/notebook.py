"""LIFT's notebook, notebooks/lift.ipynb: its part (notebooks/build_notebooks.py)."""

TITLE = "LIFT: an image tower against a frozen LLM text encoder"

INTRO = """
LIFT (`configs/lift.py`) trains only the image tower, against caption embeddings of
a **frozen** LLM: SmolLM2-135M-Instruct with the PromptEOL recipe (or all-MiniLM-L6-v2).
This notebook runs the cached mode, the cheap path: `vlpre.embed` passes every
training caption through the LLM once into a keyed store (as
`python -m vlpre.embed --config=configs/lift.py:tiny`), then the train step joins
each image to its caption's stored embedding and never runs the LLM. (Online mode, the
LLM inside the step: `--config.text_mode=online`, same loss.) Evaluations embed text
through the LLM as it goes: retrieval, zero-shot CIFAR-10, linear probe.
"""

PARAMETERS = """
STEPS = 300           # optimiser steps
BATCH = 64            # global batch
TRAIN_EXAMPLES = 1000 # the first N Flickr8k training images (5 captions each go
                      # through the LLM once); 0: all 6,000 (30,000 captions)
ENCODER = "smollm2"   # smollm2 (SmolLM2-135M, PromptEOL) | minilm (all-MiniLM-L6-v2)
DEPTH = 0             # 0: the tiny config's 12-block ViT; N: N blocks
EVAL_EXAMPLES = 1000  # images per evaluation (the probe trains on twice as many)
EVAL_EVERY = 100      # evaluate every N steps (and at the end); 0: at the end only
WORKDIR = "workdirs/notebooks/lift"
"""

TINY = dict(STEPS=6, BATCH=16, TRAIN_EXAMPLES=32, DEPTH=2, EVAL_EXAMPLES=32, EVAL_EVERY=0)
TINY_EXPECTS = {"lift-smollm2": ("retrieval_flickr8k/t2i_R@1", "zeroshot_cifar10/top1",
                                 "linear_probe_cifar10/top1")}


def cells(nb) -> list:
  return [
      nb.md("## 1. Embed the training captions once (the frozen LLM)"),
      nb.code("""
         from vlpre.text_encoders import store as store_lib

         c = config_lib.load(f"configs/lift.py:tiny,{ENCODER}")
         nbhelpers.shorten(c, STEPS, BATCH, train="flickr8k/train-*.tar", examples=TRAIN_EXAMPLES,
                           workdir=WORKDIR)
         if DEPTH:
             c.model.image.depth = DEPTH
         c.text_cache = f"{WORKDIR}/embeddings-{ENCODER}-{TRAIN_EXAMPLES}"
         del c.evals["zeroshot_imagenet_sample"]
         nbhelpers.shrink_evals(c, EVAL_EXAMPLES, EVAL_EVERY)
         print(c.text_encoder)
         store = store_lib.build_store(c, batch_size=64)  # resumable; a no-op once complete
         print(f"{len(store)} images, {store.dim}-d caption embeddings in {store.directory}")
         """),
      nb.md("## 2. Train the image tower against them"),
      nb.code("""
         run = f"{WORKDIR}/lift-{ENCODER}"
         last = train.run(c, run)
         print({k: round(v, 4) for k, v in last.items() if "/" in k and not k.startswith("perf")})
         """),
      nb.md("## Loss and evaluation curves"),
      nb.code("""
         nbhelpers.plot_curves({f"LIFT ({ENCODER})": run})
         nbhelpers.results_table({f"LIFT ({ENCODER})": run});
         """),
      nb.md("""
         ## Retrieval examples

         Captions of val images embedded by the frozen LLM (the same recipe as the store),
         against the trained image tower's embeddings of the val images.
         """),
      *nb.retrieval_and_zeroshot_cells(),
  ]
