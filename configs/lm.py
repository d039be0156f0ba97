"""Language modelling on captions: trains the packaged SmolLM2 with next-token loss.

The plain way to train vlpre's decoder in the one trainer (LCL, HIVE and bridge training
add images on top of the same layer):
  python -m vlpre.main --config=configs/lm.py:tiny --workdir=workdirs/lm_tiny
Freeze the first 10 of SmolLM2's 30 layers:
  python -m vlpre.main --config=configs/lm.py:tiny --config.llm.layer_groups="(10, 20)" \
      --config.frozen="('llm/layers_0to9/.*',)" --workdir=workdirs/lm_tiny_frozen10
"""
from vlpre import config_lib
from vlpre import llm as llm_lib


def get_config(arg=None):
  tiny = arg == "tiny"
  c = config_lib.base(arg)
  # Any Llama / Mistral / Qwen2 / Qwen3 checkpoint vlpre.llm loads; the section's other
  # fields (vlpre.llm.SECTION): layer_groups, e.g. (10, 20), their own subtrees for
  # freezing; remat (vlpre.nn.stack.REMAT_POLICIES); revision, num_layers, dtype...
  c.llm = llm_lib.config_section("smollm2-135m", remat="none" if tiny else "dots_no_batch")
  c.input = config_lib.image_input(arg, max_text_len=32 if tiny else 77)
  c.model_name = "lm"
  c.model = dict()
  c.losses = {"lm": 1.0}
  c.optim.update(lr=1e-4 if tiny else 5e-5, weight_decay=0.0, warmup_steps=10 if tiny else 500)
  c.batch_size = 16 if tiny else 512
  c.total_steps = 100 if tiny else 10_000
  c.evals = {}
  return c
