# The README's two commands: `make run` and `make test`. Everything installs into .venv/.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: run test install install-dev ui chromium ingest serve lint bench clean

run: install ingest serve

test: install-dev chromium
	$(BIN)/ruff check rag_chat ingest tests benchmarks
	$(BIN)/ruff format --check rag_chat ingest tests benchmarks
	$(BIN)/mypy
	cd frontend && npm test
	$(BIN)/python -m pytest

# torch is installed first, pinned to the local CPU build: a plain `torch` requirement would
# pull a multi-GB CUDA build.
#
# llama-cpp-python compiles (about 6 minutes on 2 cores), by default for the CPU that builds it
# (-march=native). Some of these machines are VMs whose CPU advertises AMX that the VM does not
# run: ggml's AMX kernels then die with SIGILL at the first answer. On x86-64 it is built for
# SSE4.2/AVX2/FMA/F16C instead, what every machine here runs, once, into a wheel outside the
# checkout that later installs and fresh clones (CI) reuse; pip's own wheel cache would not
# tell that build from a native one.
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
LLAMA_CMAKE   := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_SSE42=ON \
	-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
WHEELS        := $(HOME)/.cache/rag_chat/wheels/$(if $(LLAMA_CMAKE),avx2,native)

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "torch==2.13.0"
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip wheel --disable-pip-version-check --no-cache-dir \
		--no-deps -w $(WHEELS) "llama-cpp-python==$(LLAMA_VERSION)"
	$(PIP) --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed ui
install-dev: $(VENV)/.installed-dev ui

# The browser UI (React + Vite): npm ci from the committed lock file, then a production build
# into frontend/dist, which the server serves at /.
frontend/node_modules/.installed: frontend/package.json frontend/package-lock.json
	cd frontend && npm ci --no-audit --no-fund
	touch $@

ui: frontend/node_modules/.installed
	cd frontend && npm run build

# The browser tests drive Debian's Chromium (Playwright's own download does not work offline).
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

ingest:
	$(BIN)/python -m ingest data/

serve:
	$(BIN)/python -m rag_chat --host $(HOST) --port $(PORT)

bench: install-dev
	$(BIN)/python benchmarks/ingest_throughput.py

clean:
	rm -rf data/.rag
