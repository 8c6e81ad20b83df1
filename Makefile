# Twinkle: `make demo` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.twinkle-installed
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

setup: $(STAMP)

demo: setup
	$(PY) cookbook/demo.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache bench/results/*.json
