# Twinkle: `make demo` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.twinkle-installed
# A second, small venv with an old JSON-protocol Tinker SDK (0.24.x) for the compatibility tests.
VENV024 := .venv-tinker024
STAMP024 := $(VENV024)/.installed
# Debian's chromium, for the status page's headless-browser test (playwright drives it; no browser download).
CHROMIUM := /usr/bin/chromium
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean setup-browser

# scripts/setup-venv.sh: uv when it can be had (seconds), pip otherwise (minutes); a line per phase.
$(STAMP): pyproject.toml constraints.txt scripts/setup-venv.sh
	@scripts/setup-venv.sh $(VENV) $(PYTHON) constraints.txt "torch==2.13.0" -e ".[server,client,tinker,test]"
	$(PY) -c "import torch, ray, transformers, peft, tinker; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

$(STAMP024):
	@scripts/setup-venv.sh $(VENV024) $(PYTHON) constraints.txt "tinker==0.24.1"
	$(VENV024)/bin/python -c "import tinker; assert tinker.__version__.startswith('0.24'), tinker.__version__"
	@touch $(STAMP024)

setup: $(STAMP)

# The browser binary is its own stamp: installed with apt-get (sudo unless root) only when it is missing.
$(CHROMIUM):
	@echo "installing Debian's chromium (for tests/server/test_observability.py)"
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
	@test -x $(CHROMIUM) || { echo "apt-get did not install $(CHROMIUM)" >&2; exit 1; }

setup-browser: $(CHROMIUM)

demo: setup
	$(PY) cookbook/demo.py

test: setup $(STAMP024) setup-browser
	TWINKLE_TINKER024_PYTHON=$(CURDIR)/$(VENV024)/bin/python $(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(VENV024) .pytest_cache bench/results/*.json
