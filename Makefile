# The two commands a new user needs: `make demo` and `make test`. Both set the machine up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export AMENT_PREFIX_PATH := $(CURDIR)/$(VENV)
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-all lint format demo bench clean

setup:
	@scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Tests that assert wall-clock behaviour (control rates, stop deadlines, frame dropping) run in a process of
# their own per file, so threads left by other tests cannot steal their time slices.
REALTIME_FILES = $(shell grep -rl --include="test_*.py" "pytest.mark.realtime" tests)

## make test: lint + the test suite (about 6 minutes on 2 cores). Slow checks are in `make test-all`.
test: setup lint
	$(PY) -m pytest -q tests -m "not realtime"
	@for f in $(REALTIME_FILES); do $(PY) -m pytest -q -m realtime $$f || exit 1; done

## make test-all: everything, including the slow integration tests and long parity sweeps.
test-all: setup lint
	$(PY) -m pytest -q tests --runslow -m "not realtime"
	@for f in $(REALTIME_FILES); do $(PY) -m pytest -q -m realtime --runslow $$f || exit 1; done

## make demo: the main job on the built-in simulator (see README).
demo: setup
	$(VENV)/bin/omnistream demo $(DEMO_ARGS)

## make bench: the benchmarks quoted in the README (JSON under outputs/bench/).
bench: setup
	mkdir -p outputs/bench
	$(VENV)/bin/omnistream bench stream --preset small --resolution 224 --frames 16,32,64,128 --repeats 3 --json outputs/bench/stream.json
	$(VENV)/bin/omnistream bench stream --preset small --resolution 224 --frames 32,128,512 --window 16 --no-recompute --json outputs/bench/stream_window16.json

clean:
	rm -rf build outputs/bench
