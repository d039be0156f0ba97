"""Bridge training's notebook, notebooks/bridge.ipynb: its part (notebooks/build_notebooks.py)."""

TITLE = "Bridge training: pretrained LLM blocks as a vision backbone"

INTRO = """
Bridge training (`configs/bridge.py`): SmolLM2's first 4 blocks become an image
backbone (8 px patch embedding into the LLM width, last-token pooling, a linear head).
Stage 1 trains it on CIFAR-10 with **random labels** (bridging); stage 2 transfers:
a linear probe of the bridged backbone before any fine-tuning step, then fine-tuning
with true labels, layer-wise lr decay and drop-path. The same two commands as the
README, run as `vlpre.train.run` calls into `<run>/0_bridge` and `<run>/1_finetune`
(`vlpre.compare` reads the pair as one staged run).
"""

PARAMETERS = """
STEPS = 300           # bridging steps (stage 1)
FT_STEPS = 200        # fine-tuning steps (stage 2)
BATCH = 64            # global batch
TRAIN_EXAMPLES = 0    # 0: the 10,000-image CIFAR-10 training subset; N: the first N
OPTIONS = ""          # config options: ",freeze=last2" | ",freeze=first2" | ",init=random"
EVAL_EXAMPLES = 2000  # test images per evaluation (the probe trains on twice as many)
WORKDIR = "workdirs/notebooks/bridge"
"""

TINY = dict(STEPS=4, FT_STEPS=6, BATCH=32, TRAIN_EXAMPLES=64, EVAL_EXAMPLES=128)
TINY_EXPECTS = {"bridge": ("linear_probe/top1", "classify/top1")}
# Stage 1 trains on random labels, so only the fine-tuning's loss must fall.
TINY_LEARNS = ("bridge/1_finetune",)


def cells(nb) -> list:
  return [
      nb.md("## Stage 1: random-label bridging, then stage 2: probe and fine-tune"),
      nb.code("""
         run = f"{WORKDIR}/bridge"

         def make_config(stage, steps):
             c = config_lib.load(f"configs/bridge.py:tiny{OPTIONS}" + (",finetune" if stage else ""))
             nbhelpers.shorten(c, steps, BATCH, train="cifar10/train-*.tar",
                               examples=TRAIN_EXAMPLES, workdir=WORKDIR)
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
      nb.md("""
         ## Loss and evaluation curves

         Stage 1's loss is against random labels (it need not fall far); stage 2 starts at
         the dotted line with a fresh zero head (loss log 10). The probe in stage 2 runs at
         its step 0, on the backbone as stage 1 left it.
         """),
      nb.code("""
         nbhelpers.plot_curves({"bridge → fine-tune": run})
         nbhelpers.results_table({"bridge → fine-tune": run});
         """),
      nb.md("## Confusion matrix of the fine-tuned classifier (CIFAR-10 test)"),
      nb.code("""
         classnames = data.load_classnames("cifar10")
         test = nbhelpers.eval_images("cifar10/test-*.tar", EVAL_EXAMPLES,
                                      image_size=finetune.input.image_size, labels=True)
         nbhelpers.classifier_confusion(nbhelpers.load_run(finetune, f"{run}/1_finetune"), test, classnames);
         """),
  ]
