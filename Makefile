# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test
UNAME := $(shell uname -s)

.PHONY: setup sysdeps model demo test test-fast bench schema clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@$(MAKE) --no-print-directory sysdeps
	@touch $@

# Linux CPU fast path: Debian/Ubuntu's OpenBLAS, which the worker preloads under MLX by itself;
# and jq for the shell host examples (their tests skip without it).
sysdeps:
ifeq ($(UNAME),Linux)
	@command -v jq >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; $$SUDO apt-get install -y -q jq >/dev/null 2>&1; } ; } || \
	  echo "jq not installed: the shell host examples need it"
	@if ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then \
	  echo "OpenBLAS present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q libopenblas0-pthread >/dev/null; } || \
	  echo "could not install libopenblas0-pthread: the worker runs on MLX's slower reference BLAS"; \
	else \
	  echo "not a Debian-like system: install OpenBLAS yourself (see README) for ~10x faster CPU prefill"; \
	fi
endif

model: setup
	$(PY) -m worker.default_model

demo: setup
	$(PY) host_examples/python/demo_chat.py --model "$$($(PY) -m worker.default_model)"

test: setup model
	$(PY) -m pytest -q -ra
	node host_examples/node/gen_types.js --check
	MLX_WORKER_PYTHON=$(abspath $(PY)) node --test host_examples/node/test/

test-fast: setup
	$(PY) -m pytest -q -ra -m "not real_model"

# CPU quick profile (< 10 minutes on 2 cores): tables and PNG plots in bench/results/.
bench: setup model
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) -m bench --quick

schema: setup
	$(PY) -m worker.protocol.docs --write

clean:
	rm -rf $(VENV) build *.egg-info
