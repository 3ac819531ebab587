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
# pull a multi-GB CUDA build. llama-cpp-python compiles once (about 6 minutes on 2 cores);
# pip caches the wheel.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "torch==2.13.0"
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
