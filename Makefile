# Every target creates .venv itself on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck check bench bench-quick bench-peers clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m securechan demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check securechan tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy securechan

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

bench-peers:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq stunnel4 spiped iperf3 redis-server redis-tools valgrind

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
