# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CASE    ?= decoy-mnist
PORT    ?= 8501

.PHONY: run test test-slow lint build bench clean readme readme-check

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

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

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
readme: $(VENV)/.runtime
	$(BIN)/python -m core build decoy-mnist
	$(BIN)/python -m core build faces
	$(BIN)/python -m core readme

readme-check: $(VENV)/.runtime
	$(BIN)/python -m core build decoy-mnist
	$(BIN)/python -m core build faces
	$(BIN)/python -m core readme --check

clean:
	rm -rf .cache
