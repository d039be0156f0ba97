"""CLIP and SigLIP's notebook, notebooks/clip_siglip.ipynb: its part (notebooks/build_notebooks.py)."""

TITLE = "CLIP and SigLIP on Flickr8k"

INTRO = """
Two image-text towers trained from scratch on the bundled Flickr8k shards: CLIP
(symmetric InfoNCE, `configs/clip.py`) and SigLIP (pairwise sigmoid loss, attention
pooling, `configs/siglip.py`), through `vlpre.train.run`, the function behind
`python -m vlpre.main --config=configs/clip.py:tiny --workdir=...`. Then their
evaluations (Flickr8k val retrieval R@k, zero-shot CIFAR-10, a CIFAR-10 linear probe)
over training, text→image retrieval examples and a zero-shot confusion matrix.
"""

PARAMETERS = """
STEPS = 300           # optimiser steps per run (the README's table: 500)
BATCH = 64            # global batch
TRAIN_EXAMPLES = 0    # 0: all 6,000 Flickr8k training images; N: only the first N
DEPTH = 0             # 0: the tiny config's 12-block towers; N: N blocks in each tower
EVAL_EXAMPLES = 1000  # images per evaluation (the probe trains on twice as many)
EVAL_EVERY = 100      # evaluate every N steps (and at the end)
METHODS = ("clip", "siglip")
WORKDIR = "workdirs/notebooks/clip_siglip"
"""

TINY = dict(STEPS=6, BATCH=16, TRAIN_EXAMPLES=32, DEPTH=2, EVAL_EXAMPLES=64, EVAL_EVERY=3)
TINY_EXPECTS = {
    "clip": ("retrieval_flickr8k/t2i_R@1", "zeroshot_cifar10/top1", "linear_probe_cifar10/top1"),
    "siglip": ("retrieval_flickr8k/t2i_R@1", "zeroshot_cifar10/top1", "linear_probe_cifar10/top1"),
}


def cells(nb) -> list:
  return [
      nb.md("""
         ## Train

         The `:tiny` configs are the CPU-sized runs of the README (ViT-Ti/8 at 64 px and a
         12-layer text transformer, width 192). The parameters above shorten them; the
         zero-shot imagenet_sample evaluation (1,000 class prompts) is left out here.
         `train.run` resumes a workdir, so rerunning this cell continues or skips finished runs.
         """),
      nb.code("""
         def make_config(method):
             c = config_lib.load(f"configs/{method}.py:tiny")
             nbhelpers.shorten(c, STEPS, BATCH, train="flickr8k/train-*.tar",
                               examples=TRAIN_EXAMPLES, workdir=WORKDIR)
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
      nb.md("""
         ## Loss and evaluation curves

         From each run's `metrics.jsonl` (`vlpre.compare.read_run`); the table is
         `vlpre.compare`'s (R@k and top-1 as fractions).
         """),
      nb.code("""
         names = {"clip": "CLIP", "siglip": "SigLIP"}
         nbhelpers.plot_curves({names[m]: runs[m] for m in METHODS})
         nbhelpers.results_table({names[m]: runs[m] for m in METHODS});
         """),
      nb.md("""
         ## Retrieval examples

         Each row: a caption of a val image, and the images whose embeddings are nearest to
         the caption's (the true image framed green when it is among them).
         """),
      nb.code("""
         loaded = {m: nbhelpers.load_run(configs[m], runs[m]) for m in METHODS}
         size = configs[METHODS[0]].input.image_size
         val = nbhelpers.eval_images("flickr8k/val-*.tar", EVAL_EXAMPLES, image_size=size, captions=True)
         for m in METHODS:
             print(names[m])
             nbhelpers.retrieval_grid(loaded[m], val)
         """),
      nb.md("## Zero-shot CIFAR-10: confusion matrix\n\nPrompt: `a photo of a {class}.`"),
      nb.code("""
         classnames = data.load_classnames("cifar10")
         test = nbhelpers.eval_images("cifar10/test-*.tar", EVAL_EXAMPLES, image_size=size, labels=True)
         for m in METHODS:
             print(names[m])
             nbhelpers.zeroshot_confusion(loaded[m], test, classnames)
         """),
  ]
