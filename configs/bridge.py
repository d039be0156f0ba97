"""Bridge training: pretrained LLM blocks as a vision backbone (arXiv 2604.01833).

Random-label bridge training of SmolLM2's first blocks on CIFAR-10 (tiny, CPU-sized):
  python -m vlpre.main --config=configs/bridge.py:tiny --workdir=workdirs/bridge_tiny
The same architecture from random init, and without random labels (supervised):
  python -m vlpre.main --config=configs/bridge.py:tiny --config.bridge.pretrained=False --workdir=...
  python -m vlpre.main --config=configs/bridge.py:tiny --config.bridge.random_label_ratio=0 --workdir=...
Partial bridging (the last 2 of the 4 blocks frozen as pretrained):
  python -m vlpre.main --config=configs/bridge.py:tiny --config.bridge.layer_groups="(2, 2)" \
      --config.frozen="('llm/layers_2to3/.*',)" --workdir=workdirs/bridge_tiny_partial
"""
from vlpre import config_lib


def get_config(arg=None):
  tiny = arg == "tiny"
  c = config_lib.base(arg)
  c.bridge = dict(
      llm="smollm2-135m",     # any checkpoint vlpre.llm loads (the paper: GPT-2 Medium, Qwen3-8B)
      num_layers=4 if tiny else 0,  # the first N blocks (0: all)
      causal=True,            # as pretrained; False: bidirectional
      layer_groups=(),        # scanned groups, e.g. (2, 2), for freezing by regex
      pretrained=True,        # False: the same architecture from random init
      drop_path=0.1,          # stochastic depth of the last block (the paper: 0.1)
      random_label_ratio=1.0)  # share of labels reassigned to another class (0: true labels)
  c.input = config_lib.image_input(
      arg, train="cifar10/train-*.tar", label=True, image_size=32 if tiny else 224,
      resize_size=36 if tiny else 256, flip=True)
  c.model_name = "bridge"
  c.model = dict(num_classes=10, patch_size=4 if tiny else 16, pooling="last")
  c.losses = {"softmax_ce": 1.0}
  # The paper: AdamW lr 1e-3, wd 0.05, layer-wise lr decay 0.75, drop-path 0.1.
  c.optim.update(lr=1e-3, weight_decay=0.05, b2=0.999, warmup_steps=20 if tiny else 2_000,
                 layer_decay=0.75)  # block i of L trains at lr·0.75^(L−i) (vlpre/optim.py)
  c.batch_size = 64 if tiny else 1024
  c.total_steps = 300 if tiny else 100_000
  size = dict(image_size=c.input.image_size, resize_size=c.input.resize_size,
              batch_size=250 if tiny else 1024)
  c.evals = dict(
      classify=dict(kind="classification", data="cifar10/test-*.tar", max_examples=2000 if tiny else 0,
                    every_steps=0, **size),
      linear_probe=dict(kind="linear_probe", num_classes=10, every_steps=0,
                        train_data="cifar10/train-*.tar", test_data="cifar10/test-*.tar",
                        max_train_examples=5000 if tiny else 0,
                        max_examples=2000 if tiny else 0, **size))
  return c
