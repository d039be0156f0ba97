"""LCL's notebook, notebooks/lcl.ipynb: its part (notebooks/build_notebooks.py)."""

TITLE = "LCL: latent compression learning on interleaved image-text documents"

INTRO = """
LCL (`configs/lcl.py`) trains a ViT from scratch together with a causal model on
interleaved documents: an InfoNCE between the causal model's output at each `<soi>`
and the image's latent (L_con), plus next-token loss on the text (L_gen). The
documents are built from Flickr8k pairs (2-4 consecutive images per document, each
followed by one of its captions; `python -m vlpre.data.convert --mode=interleaved`).
Evaluations: retrieval and zero-shot CIFAR-10 read text through the causal model,
linear and attentive probes of the ViT, captioning.
"""

PARAMETERS = """
STEPS = 300           # optimiser steps
BATCH = 16            # packed rows of 128 tokens (up to 4 images each)
TRAIN_EXAMPLES = 0    # 0: all 6,000 Flickr8k training images; N: only the first N
OPTIONS = ""          # config options after "tiny": ",paired" | ",contrastive" | ...
DEPTH = 0             # 0: the tiny config's 12-block ViT; N: N blocks
EVAL_EXAMPLES = 1000  # images per evaluation (probes train on twice as many)
EVAL_EVERY = 100      # evaluate every N steps (and at the end)
CAPTION_TOKENS = 24   # longest generated caption
WORKDIR = "workdirs/notebooks/lcl"
"""

TINY = dict(STEPS=6, BATCH=8, TRAIN_EXAMPLES=48, DEPTH=2, EVAL_EXAMPLES=32, EVAL_EVERY=3,
            CAPTION_TOKENS=6)
TINY_EXPECTS = {"lcl": ("retrieval_flickr8k/t2i_R@1", "zeroshot_cifar10/top1",
                        "linear_probe_cifar10/top1", "attentive_probe_cifar10/top1",
                        "captioning_flickr8k/cider")}


def cells(nb) -> list:
  return [
      nb.md("## Interleaved documents from Flickr8k pairs"),
      nb.code("""
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
      nb.md("## Train"),
      nb.code("""
         c = config_lib.load(f"configs/lcl.py:tiny{OPTIONS}")
         nbhelpers.shorten(c, STEPS, BATCH)  # the subset of pairs is the documents' (above)
         c.input.documents, c.input.images, c.input.paired = documents, pairs, pairs
         if DEPTH:
             c.model.image.depth = DEPTH
         nbhelpers.shrink_evals(c, EVAL_EXAMPLES, EVAL_EVERY)
         c.evals.captioning_flickr8k.max_new_tokens = CAPTION_TOKENS
         run = f"{WORKDIR}/lcl"
         last = train.run(c, run)
         print({k: round(v, 4) for k, v in last.items() if "/" in k and not k.startswith(("perf", "lcl"))})
         """),
      nb.md("## Loss and evaluation curves"),
      nb.code("""
         nbhelpers.plot_curves({"LCL": run})
         nbhelpers.results_table({"LCL": run});
         """),
      nb.md("""
         ## Retrieval examples

         A caption is read by the causal model with `<soi>` appended; its output there,
         projected, is compared with the images' latents.
         """),
      *nb.retrieval_and_zeroshot_cells(),
      nb.md("## Captions (greedy, after `<soi>` + the visual tokens + `<eoi>`)"),
      nb.code("nbhelpers.show_captions(loaded, val, count=4, max_new_tokens=CAPTION_TOKENS);"),
  ]
