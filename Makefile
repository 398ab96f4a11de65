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

demo: $(VENV)/.installed
	$(BIN)/raysys demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check raysys tests benchmarks jobs

test-cluster: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m cluster

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/decode.py --data $(or $(DATA),../shared/rsna-sample)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
