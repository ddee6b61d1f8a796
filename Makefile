# Two commands do all the set-up: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test lint typecheck protos protos-check unit clean bench

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fedcompute demo $(ARGS)

protos: $(BIN)/.installed
	PYTHON=$(BIN)/python scripts/gen_protos.sh

protos-check: $(BIN)/.installed
	PYTHON=$(BIN)/python scripts/check_protos.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

typecheck: $(BIN)/.installed
	$(BIN)/mypy

# One test process per core, four at most (pytest-xdist): on two cores the suite takes ~2/3 of one process's time.
test: protos-check lint typecheck
	$(BIN)/pytest -q --durations=15 --numprocesses=auto --maxprocesses=4 --dist=worksteal

bench: $(BIN)/.installed  # not part of test: 5-7 minutes on 2 cores; ARGS="--quick" or "--only NAME"
	GRPC_VERBOSITY=ERROR $(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
