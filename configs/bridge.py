"""Bridge training: pretrained LLM blocks as a vision backbone (arXiv 2604.01833).

Two stages, each an ordinary run of the one trainer (tiny: SmolLM2's first 4 blocks on
32 px CIFAR-10, CPU-sized):
  # 1. random-label bridge training (every label moved to another class)
  python -m vlpre.main --config=configs/bridge.py:tiny --workdir=workdirs/bridge_tiny
  # 2. transfer: linear probe of the bridged backbone (before step 1) and full fine-tuning
  #    with true labels, layer-wise lr decay and drop-path; a fresh head
  python -m vlpre.main --config=configs/bridge.py:tiny,finetune \
      --config.init_from.workdir=workdirs/bridge_tiny --workdir=workdirs/bridge_tiny_ft
Options after the variant, comma-separated:
  finetune                  stage 2 (without init_from: transfer from the un-bridged LLM blocks)
  target=fashion_mnist      stage 2 on Fashion-MNIST (`make fashion-mnist` builds the shards)
  init=random               the same architecture from random init (no LLM weights)
  freeze=last2 | first2     partial bridging: those LLM blocks stay as pretrained
                            (stage 2 must use the same option: it sets the block groups)
The results table, every variant at equal compute: `python -m vlpre.methods.bridge.table`.
"""
import ml_collections as mlc

from vlpre import config_lib
from vlpre import llm as llm_lib

TARGETS = {  # name → (data_dir, train glob, test glob, classes); None: ../shared/data
    "cifar10": (None, "cifar10/train-*.tar", "cifar10/test-*.tar", 10),
    "fashion_mnist": ("workdirs/data", "fashion_mnist/train-*.tar", "fashion_mnist/test-*.tar", 10),
}
FREEZE = {"last2": ((2, 2), ("llm/layers_2to3/.*",)),
          "first2": ((2, 2), ("llm/layers_0to1/.*",))}


def get_config(arg=None):
  variant, opts = config_lib.parse_arg(arg, {
      "finetune": None, "target": tuple(TARGETS), "init": ("pretrained", "random"),
      "freeze": ("none", *FREEZE)})
  tiny = variant == "tiny"
  finetune = "finetune" in opts
  data_dir, train, test, num_classes = TARGETS[opts.get("target", "cifar10")]
  c = config_lib.base("tiny" if tiny else None)
  c.bridge = dict(
      # Any checkpoint vlpre.llm loads (the paper: GPT-2 Medium, Qwen3-8B); its section
      # (vlpre.llm.SECTION) also says num_layers (the first N blocks, 0: all), causal
      # (False: bidirectional) and layer_groups (e.g. (2, 2), for freezing by regex).
      llm=llm_lib.config_section("smollm2-135m", num_layers=4 if tiny else 0),
      pretrained=opts.get("init", "pretrained") == "pretrained",  # False: random init
      drop_path=0.1,          # stochastic depth of the last block (the paper: 0.1)
      # Share of labels reassigned to another class (0: true labels; stage 2 uses those).
      random_label_ratio=0.0 if finetune else 1.0)
  if opts.get("freeze", "none") != "none":
    c.bridge.llm.layer_groups, frozen = FREEZE[opts["freeze"]]
    if not finetune:
      c.frozen = frozen       # stage 2 fine-tunes every block
  c.input = config_lib.image_input(
      "tiny" if tiny else None, train=train, data_dir=data_dir, label=True, num_classes=num_classes,
      image_size=32 if tiny else 224, resize_size=36 if tiny else 256, flip=True)
  c.model_name = "bridge"
  # Tiny: 8 px patches, 16 tokens per 32 px image (4 px patches cost 4× the compute).
  c.model = dict(num_classes=num_classes, patch_size=8 if tiny else 16, pooling="last")
  c.losses = {"softmax_ce": 1.0}
  # The paper: AdamW lr 1e-3, wd 0.05, layer-wise lr decay 0.75, drop-path 0.1.
  c.optim.update(lr=5e-4 if finetune else 1e-3, weight_decay=0.05, b2=0.999,
                 warmup_steps=20 if tiny else 2_000,
                 layer_decay=0.75)  # block i of L trains at lr·0.75^(L−i) (vlpre/optim.py)
  c.batch_size = 64 if tiny else 1024
  c.total_steps = 300 if tiny else 100_000
  # Stage 2 starts from stage 1's patch embedding and LLM blocks; the head starts afresh.
  c.init_from = dict(workdir="", prefixes=("patch_embed", "llm"))
  size = dict(image_size=c.input.image_size, resize_size=32 if tiny else 256,
              batch_size=250 if tiny else 1024, data_dir=data_dir)
  probe = dict(kind="linear_probe", num_classes=num_classes, every_steps=0,
               train_data=train, test_data=test, max_train_examples=5000 if tiny else 0,
               max_examples=2000 if tiny else 0, **size)
  if finetune:
    c.evals = mlc.ConfigDict(dict(
        linear_probe=dict(probe, at_start=True, at_end=False),
        classify=dict(kind="classification", data=test, max_examples=2000 if tiny else 0,
                      every_steps=0, **size)))
  else:
    c.evals = mlc.ConfigDict(dict(linear_probe=probe))
  return c
