# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean registration

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/defectlens demo --out demo-output

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

# Rebuild the shipped RegAD registration model from freely licensed images (~10 min, 2 cores).
registration: install
	$(BIN)/python -m defectlens.training.default_registration

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf demo-output .pytest_cache build src/*.egg-info
