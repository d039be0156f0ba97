"""HIVE's notebook, notebooks/hive.ipynb: its part (notebooks/build_notebooks.py)."""

TITLE = "HIVE: a ViT trained inside a captioner (hierarchical cross-attention)"

INTRO = """
HIVE (`configs/hive.py`) continues training a vision encoder as part of a captioner:
the ViT's blocks 3/6/9/12 feed SmolLM2's layers 8/16/24/30 through cross-attention
(`mode=hive`), or the final ViT features enter at the LLM input (`mode=sa`, the
LLaVA-style baseline). Next-token loss on Flickr8k captions, in three stages
(`vlpre.stages.run`, as `python -m vlpre.main` runs a staged config): projectors only,
then + LLM, then everything. The ViT starts from scratch here (`INIT_FROM` takes a
LIFT or CLIP run). Evaluations: CIFAR-10 linear and attentive probes of the ViT before
and after, captioning BLEU-4 / CIDEr on Flickr8k val.
"""

PARAMETERS = """
STEPS = 100            # steps per stage (three stages)
BATCH = 32             # captions per step
MODES = ("hive", "sa") # hive: cross-attention; sa: the LLaVA-style cascade
INIT_FROM = ""         # a vlpre run whose ViT ("img") to start from; "": from scratch
TRAIN_EXAMPLES = 0     # 0: all 6,000 Flickr8k training images; N: only the first N
EVAL_EXAMPLES = 200    # images per evaluation (probes train on twice as many)
CAPTION_TOKENS = 24    # longest generated caption
WORKDIR = "workdirs/notebooks/hive"
"""

TINY = dict(STEPS=2, BATCH=8, MODES=("hive",), TRAIN_EXAMPLES=8, EVAL_EXAMPLES=16,
            CAPTION_TOKENS=6)
TINY_EXPECTS = {"hive": ("captioning/cider", "linear_probe/top1", "attentive_probe/top1")}


def cells(nb) -> list:
  return [
      nb.md("## Train the three stages, for each mode"),
      nb.code("""
         from vlpre import stages

         def make_config(mode):
             c = config_lib.load(f"configs/hive.py:tiny,mode={mode}")
             nbhelpers.shorten(c, STEPS, BATCH, train="flickr8k/train-*.tar",
                               examples=TRAIN_EXAMPLES, workdir=WORKDIR)
             c.stages = tuple(dict(s, steps=STEPS, optim=dict(s["optim"], warmup_steps=max(1, min(10, STEPS // 5))))
                              for s in c.stages)
             c.total_steps = 3 * STEPS  # three stages of STEPS each
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
      nb.md("""
         ## Loss and evaluation curves

         The stages are concatenated (dotted lines where stages 2 and 3 start); the probes ran
         before stage 1 (step 0) and after stage 3.
         """),
      nb.code("""
         names = {"hive": "HIVE", "sa": "SA"}
         nbhelpers.plot_curves({names[m]: runs[m] for m in MODES})
         nbhelpers.results_table({names[m]: runs[m] for m in MODES});
         """),
      nb.md("## Captions of val images"),
      nb.code("""
         size = configs[MODES[0]].input.image_size
         val = nbhelpers.eval_images("flickr8k/val-*.tar", 8, image_size=size, captions=True)
         for m in MODES:
             print(names[m])
             nbhelpers.show_captions(nbhelpers.load_run(configs[m], runs[m]), val, count=4,
                                     max_new_tokens=CAPTION_TOKENS)
         """),
  ]
