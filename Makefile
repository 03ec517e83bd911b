# heptapod_nb: `make demo` runs the app on the bundled default, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
NBDEV_SPEC := nbdev==2.4.14 "fastcore<2" "execnb<0.2" "ghapi<2"
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test setup check-sync lint nbtest nbdev-test pytest export clean-nbs help docs

help:
	@echo "make demo   - set up .venv and open the Heptapod app on MNIST-5k (http://127.0.0.1:7860)"
	@echo "make test   - set up .venv, check notebooks/modules are in sync, run notebooks and tutorials (building the docs site), pytest"
	@echo "make docs   - the docs site in _docs/ (open _docs/index.html): every notebook and tutorial executed, API reference"

# The venv is (re)built whenever the package's settings change: one progress line a step, then only what pip warns of
# (setuptools' note on editable installs, "Editable installation", is not for the user: it is silenced).
$(BIN)/.installed: settings.ini setup.py pyproject.toml
	@test -x $(BIN)/python || { echo "setup: creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "setup [1/4]: pip"; $(BIN)/python -m pip install -q --upgrade pip
	@echo "setup [2/4]: $(TORCH_SPEC) (the longest download)"; $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	@echo "setup [3/4]: nbdev"; $(BIN)/python -m pip install -q $(NBDEV_SPEC)
	@echo "setup [4/4]: heptapod_nb and its dependencies (Gradio, Jupyter, Playwright)"
	@PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/.installed

demo: setup
	@$(BIN)/heptapod-demo

# Fails when nbdev_export or nbdev_clean would change a file: notebooks are the source of truth.
check-sync: setup
	@bash tools/check_sync.sh

# Every notebook and tutorial is executed once, in fast mode, by the docs build (the same executor and skip flags
# as nbdev_test): a failing cell fails `make test`, and so does a docs site that no longer builds.
nbtest: setup $(BIN)/.docs-installed
	HEPTAPOD_FAST=1 $(BIN)/python tools/build_docs.py --no-cache --strict

# nbdev's own runner, for a quick check of the notebooks alone (no site)
nbdev-test: setup
	HEPTAPOD_FAST=1 $(BIN)/nbdev_test --path nbs --n_workers 2 --do_print --timing
	HEPTAPOD_FAST=1 $(BIN)/nbdev_test --path tutorials --n_workers 2 --do_print --timing

# Two test processes (pytest-xdist), one torch thread each (tests/conftest.py): 2 cores busy, not 1. A module's
# tests stay on one process (--dist loadscope), so its module-scoped fixtures (trained models) are built once.
pytest: setup
	HEPTAPOD_FAST=1 $(BIN)/python -m pytest tests -q -ra -n 2 --dist loadscope

# Line length (120), pyflakes and syntax on the exported package and the benchmarks (pyproject.toml, [tool.ruff];
# tools/lint.py leaves out only the first line of nbdev's generated __all__, which nbdev wraps past 120)
lint: setup
	$(BIN)/python tools/lint.py heptapod_nb bench

test: check-sync lint nbtest pytest

export: setup
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/nbdev_clean --fname tutorials

# The docs site in _docs/ (open _docs/index.html, no server needed), built offline: every notebook and tutorial
# executed (cells flagged slow/gpu/eval: false skipped, as nbdev_test does) with its pictures, the README as the
# landing page, the API reference from docstrings. `make test` builds the fast site (build/site-fast/, a banner on
# every page) and never touches _docs/; --strict:
# a broken link fails the build, so the site cannot rot.
DOCS_SPEC := mkdocs==1.6.1 mkdocs-material==9.8.2 mkdocs-jupyter==0.26.3 "mkdocstrings[python]==1.0.8" mkdocstrings-python==2.0.11
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q $(DOCS_SPEC)
	@touch $@

docs: setup $(BIN)/.docs-installed
	$(BIN)/python tools/build_docs.py --strict
