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

.PHONY: demo test setup check-sync nbtest pytest export clean-nbs help

help:
	@echo "make demo   - set up .venv and open the Heptapod app on MNIST-5k (http://127.0.0.1:7860)"
	@echo "make test   - set up .venv, check notebooks/modules are in sync, run notebooks, tutorials and pytest"

# The venv is (re)built whenever the package's settings change.
$(BIN)/.installed: settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(NBDEV_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/heptapod-demo

# Fails when nbdev_export or nbdev_clean would change a file: notebooks are the source of truth.
check-sync: setup
	@bash tools/check_sync.sh

nbtest: setup
	HEPTAPOD_FAST=1 $(BIN)/nbdev_test --path nbs --n_workers 2 --do_print --timing
	@if ls tutorials/*.ipynb >/dev/null 2>&1; then HEPTAPOD_FAST=1 $(BIN)/nbdev_test --path tutorials --n_workers 2 --do_print --timing; fi

pytest: setup
	HEPTAPOD_FAST=1 $(BIN)/python -m pytest tests -q -ra

test: check-sync nbtest pytest

export: setup
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/nbdev_clean --fname tutorials
