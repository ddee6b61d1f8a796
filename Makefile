# Two commands do all the set-up: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV := .venv
# the round benchmark's limit, Flower's simulation engine, with pins of its own (grpcio, protobuf) apart from ours
FLOWER := .venv-flower
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test lint typecheck protos protos-check unit clean bench flower

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

bench: $(BIN)/.installed  # not part of test: 6-10 minutes on 2 cores; ARGS="--quick" or "--only NAME"
	$(MAKE) --no-print-directory flower || echo "no $(FLOWER): the round benchmark's limit is the issue's constant"
	GRPC_VERBOSITY=ERROR $(BIN)/python -m bench.run $(ARGS)

flower: $(FLOWER)/bin/.installed

$(FLOWER)/bin/.installed:
	test -x $(FLOWER)/bin/python || $(PYTHON) -m venv $(FLOWER)
	$(FLOWER)/bin/python -m pip install --quiet 'flwr[simulation]==1.42.0'
	touch $@

clean:
	rm -rf $(VENV) $(FLOWER) .mypy_cache .pytest_cache .ruff_cache
