# Set-up and entry points. Every target does its own set-up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint test-cluster bench clean

# The venv is rebuilt when pyproject.toml changes; the stamp records a finished install.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.venv: $(VENV)/.installed

# A real browser for the viewer's tests: Debian's Chromium and its driver (offline: no download at test time).
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
$(BROWSER):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver

demo: $(VENV)/.installed
	$(BIN)/raysys demo

test: $(VENV)/.installed $(BROWSER)
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check raysys tests benchmarks jobs

test-cluster: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m cluster

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/decode.py --data $(or $(DATA),../shared/rsna-sample)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
