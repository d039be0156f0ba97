"""GPT4Image's notebook, notebooks/gpt4image.ipynb: its part (notebooks/build_notebooks.py)."""

TITLE = "GPT4Image: LLM-written descriptions as extra supervision"

INTRO = """
GPT4Image (`configs/gpt4image.py`) trains an ordinary classifier (here the tiny
ResNet-18 at 1/8 width on 32 px CIFAR-10) with one extra loss pulling a projection of
its feature towards a frozen text encoder's embedding of an LLM-written description
of the image: L = CE + λ·L_text. Three stages, as the three commands of the README:
(1) `vlpre.methods.gpt4image.describe`: SmolLM2 writes descriptions per class from the class name;
(2) `vlpre.embed`: all-MiniLM-L6-v2 embeds them, keyed by image;
(3) `vlpre.train.run`, with the text loss and without it (the CE-only baseline, λ = 0).
Evaluations: top-1 of the classifier's head and a linear probe on CIFAR-10 test.
"""

PARAMETERS = """
STEPS = 250            # optimiser steps per run
BATCH = 128            # global batch
TRAIN_EXAMPLES = 0     # 0: the 10,000-image CIFAR-10 training subset; N: the first N
PER_CLASS = 8          # descriptions SmolLM2 writes per class
MAX_NEW_TOKENS = 48    # their length limit (tokens)
LAMBDAS = (0.0, 0.3)   # text-loss weights to train with (0: the CE-only baseline)
EVAL_EXAMPLES = 2000   # test images per evaluation (the probe trains on twice as many)
EVAL_EVERY = 50        # evaluate every N steps (and at the end)
WORKDIR = "workdirs/notebooks/gpt4image"
"""

TINY = dict(STEPS=8, BATCH=32, TRAIN_EXAMPLES=32, PER_CLASS=1, MAX_NEW_TOKENS=24,
            EVAL_EXAMPLES=128, EVAL_EVERY=4)
TINY_EXPECTS = {"lambda0.0": ("classify/top1", "linear_probe/top1"),
                "lambda0.3": ("classify/top1", "linear_probe/top1")}


def cells(nb) -> list:
  return [
      nb.md("## 1. Descriptions (SmolLM2, from the class names)"),
      nb.code("""
         from vlpre.methods.gpt4image import describe
         from vlpre.text_encoders import store as store_lib

         def make_config(weight):
             c = config_lib.load("configs/gpt4image.py:tiny")
             nbhelpers.shorten(c, STEPS, BATCH, train="cifar10/train-*.tar",
                               examples=TRAIN_EXAMPLES, workdir=WORKDIR)
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
      nb.md("## 2. Their frozen text embeddings (all-MiniLM-L6-v2), keyed by image"),
      nb.code("""
         if max(LAMBDAS) > 0:
             store = store_lib.build_store(c, batch_size=64)
             print(f"{len(store)} images, {store.dim}-d description embeddings")
         """),
      nb.md("## 3. Train: CE + λ·L_text, and the CE-only baseline"),
      nb.code("""
         runs = {w: f"{WORKDIR}/lambda{w}" for w in LAMBDAS}
         for w in LAMBDAS:
             last = train.run(configs[w], runs[w])
             print(f"λ={w}", {k: round(v, 4) for k, v in last.items() if k.startswith(("classify", "linear"))})
         """),
      nb.md("## Loss and evaluation curves"),
      nb.code("""
         names = {w: ("CE only" if w == 0 else f"CE + {w}·L_text") for w in LAMBDAS}
         nbhelpers.plot_curves({names[w]: runs[w] for w in LAMBDAS})
         nbhelpers.results_table({names[w]: runs[w] for w in LAMBDAS});
         """),
      nb.md("""
         ## Confusion matrix of the classifier

         GPT4Image has no zero-shot classifier (the text side exists only in training), so
         this is the trained head's confusion on CIFAR-10 test.
         """),
      nb.code("""
         test = nbhelpers.eval_images("cifar10/test-*.tar", EVAL_EXAMPLES, image_size=c.input.image_size,
                                      labels=True)
         for w in LAMBDAS:
             print(names[w])
             nbhelpers.classifier_confusion(nbhelpers.load_run(configs[w], runs[w]), test, classnames)
         """),
  ]
