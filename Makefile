# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean registration browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/defectlens demo --out demo-output

test: install browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

# The dashboard test drives the system Chromium (Playwright's own download cannot work offline):
# installed from Debian when missing, which needs root.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
	  else \
	    echo "the dashboard test needs Chromium: sudo apt-get install chromium" >&2; exit 1; \
	  fi; }

# Rebuild the shipped RegAD registration model from freely licensed images (~10 min, 2 cores).
registration: install
	$(BIN)/python -m defectlens.training.default_registration

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf demo-output .pytest_cache build src/*.egg-info
