# `make run` and `make test` work on a fresh machine with python3 (>= 3.11).
PYTHON ?= python3
# Tests import the checkout (the installed copy only serves twistd and the scripts).
export PYTHONPATH := $(CURDIR)
VENV   ?= .venv
BIN    := $(VENV)/bin
SOURCES := $(shell find shtalk twisted -name '*.py' -o -name '*.txt' -o -name '*.json') setup.cfg setup.py pyproject.toml

.PHONY: run test unit system lint typecheck bench clean

# Installed (not editable) so `twistd` finds the plugin exactly as a user's install would.
$(BIN)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 'setuptools >= 70.1' wheel
	rm -rf build  # a stale setuptools build dir would ship modules that were moved away
	# The venv's own setuptools builds the package: no second, isolated resolution of
	# the build tools (one fewer download that can fail).
	$(BIN)/python -m pip install -q --no-build-isolation '.[test,dev]'
	rm -rf build
	touch $@

run: $(BIN)/.installed
	$(BIN)/twistd -n shtalk $(ARGS)

unit: $(BIN)/.installed
	$(BIN)/trial shtalk

system: $(BIN)/.installed
	$(BIN)/trial tests

lint: $(BIN)/.installed
	$(BIN)/ruff check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy

test: $(BIN)/.installed
	$(BIN)/trial shtalk
	$(BIN)/trial tests
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python -m bench.crypto
	$(BIN)/python -m bench.fanout
	$(BIN)/python -m bench.e2e
	$(BIN)/python -m bench.ratelimit
	$(BIN)/python -m bench.urwid

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* .mypy_cache .ruff_cache
