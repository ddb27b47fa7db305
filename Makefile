# Two commands for people and CI (see README):
#   make demo   broker + one simulated device on embedded defaults
#   make test   format check, lint, type check, tests
# and, for the performance figures (bench/README.md):
#   make bench        every scenario at full size; writes docs/benchmarks.md
#   make bench-quick  the CI smoke run of the same scenarios (seconds each)
# and, for the reliability scorecard (reliability/README.md):
#   make reliability  tests/reliability at full size; writes docs/reliability.md
#   make soak         the hour-long soak (not in CI)
# Each creates .venv on first use (and again when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint clean bench bench-quick reliability soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# sslyze pins an older cryptography than ours: it gets a venv of its own.
	$(PYTHON) -m venv $(VENV)/tools/sslyze
	$(VENV)/tools/sslyze/bin/python -m pip install --quiet 'sslyze>=6.3'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/relay demo

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/check

bench: $(STAMP)
	$(BIN)/python -m bench --full

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

reliability: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m reliability

soak: $(STAMP)
	$(BIN)/python -m reliability.soak --minutes 60

lint: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/check --lint-only

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
