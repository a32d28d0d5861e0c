# Two entry points for a fresh machine: `make demo` and `make test`. Each makes its own virtualenv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25.1"
	$(BIN)/python -m pip install -q -e ".[all]" --group dev
	rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fleetbus demo

test: $(STAMP)
	./scripts/ensure-system-packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow"

# Benchmarks print ratios against a baseline measured in the same run; they take minutes, not seconds.
bench: $(STAMP)
	./scripts/ensure-system-packages
	$(BIN)/python bench/broker.py --quick
	$(BIN)/python bench/device.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/auth.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
