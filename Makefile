# Twinkle: `make demo` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.twinkle-installed
# A second, small venv with an old JSON-protocol Tinker SDK (0.24.x) for the compatibility tests.
VENV024 := .venv-tinker024
STAMP024 := $(VENV024)/.installed
PIP_FLAGS := --quiet --disable-pip-version-check --progress-bar off
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) "torch==2.13.0" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PIP) install $(PIP_FLAGS) -c constraints.txt -e ".[server,client,tinker,test]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, ray, transformers, peft, tinker; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

$(STAMP024):
	test -x $(VENV024)/bin/python || $(PYTHON) -m venv $(VENV024)
	$(VENV024)/bin/pip install $(PIP_FLAGS) "tinker==0.24.1" 2>&1 | grep -v "is ignored: it is neither" || true
	$(VENV024)/bin/python -c "import tinker; assert tinker.__version__.startswith('0.24'), tinker.__version__"
	touch $(STAMP024)

setup: $(STAMP)

demo: setup
	$(PY) cookbook/demo.py

test: setup $(STAMP024)
	TWINKLE_TINKER024_PYTHON=$(CURDIR)/$(VENV024)/bin/python $(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(VENV024) .pytest_cache bench/results/*.json
