# Two commands for a fresh clone: `make demo` and `make test` (both set up .venv first).
SHELL := /bin/bash
VENV  := .venv
VPY   := $(VENV)/bin/python

# A Python >= 3.12: $(PYTHON) if given, else python3.13/python3.12/python3 on PATH,
# else the newest pyenv-installed 3.12+.
PYTHON ?= $(shell tools/find_python.sh)

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
	  echo "error: no Python >= 3.12 found (PATH or pyenv). Install one and run e.g. 'make PYTHON=/path/to/python3.12 $(MAKECMDGOALS)'."; exit 1; fi
	@echo "Using $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(VPY) tools/run_demo.py

test: setup
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs demo_assets
