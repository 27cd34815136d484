# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CASE    ?= decoy-mnist
PORT    ?= 8501

.PHONY: run test test-slow lint build bench clean readme readme-check builtins

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamp files make the installs idempotent: pip runs only when a requirements file changed.
# facenet-pytorch pins an old torch: it is installed without its dependencies (the faces case
# reads only the O-Net weights file from its wheel and never imports the package).
$(VENV)/.runtime: requirements.txt | $(BIN)/python
	@echo "Installing the runtime packages (a few minutes on a fresh machine; pip shows its progress)"
	$(BIN)/pip install --progress-bar on -r requirements.txt
	$(BIN)/pip install -q --no-deps facenet-pytorch==2.6.0
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps facenet-pytorch==2.6.0
	touch $(VENV)/.runtime $@

# Serve at once, build behind: the data first (the first chapter draws from it), then the rest in
# one background worker (its progress is in the sidebar; the chapters fill in as stages land).
run: $(VENV)/.runtime
	$(BIN)/python -m core build $(CASE) --stages data
	$(BIN)/python -m core build $(CASE) --background
	CASEBOOK_CASE=$(CASE) $(BIN)/streamlit run app.py --server.port $(PORT) --server.headless true

# The suite in two worker processes (pytest-xdist; each has its own temporary cache and builds the
# small case once): 13.3 min against 17 min in one process on the 2-core machine, same 962 tests.
JOBS ?= 2

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(JOBS)

test-slow: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.dev
	$(BIN)/ruff check .

build: $(VENV)/.runtime
	$(BIN)/python -m core build $(CASE)

bench: $(VENV)/.dev
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/metrics.py

# The README's result numbers are generated from the built cases; CI fails when they drift.
# The built-in cases build side by side (a build runs torch on one thread, so two builds use both
# cores of a 2-core machine: measured 736 s for both at once against 525 + 724 s one after the
# other); each case's output is printed whole when it is done.
BUILTIN := decoy-mnist faces

builtins: $(VENV)/.runtime
	$(MAKE) --no-print-directory -j2 --output-sync=target $(addprefix build-,$(BUILTIN))

build-%: $(VENV)/.runtime
	$(BIN)/python -m core build $*

readme: builtins
	$(BIN)/python -m core readme

readme-check: builtins
	$(BIN)/python -m core readme --check

clean:
	rm -rf .cache
