# Two entry points (see README): `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint typecheck gpu-check

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	scripts/run.sh

test: $(STAMP)
	scripts/test.sh

# The inner loop: unit tests only (no services, no browser, no whole fits), well under a minute.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest tests/ml tests/test_deploy.py -q -m "not slow and not integration and not browser"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# mypy over apps/ and ml/, strict on both (mypy.ini); `make test` runs it too (tests/test_types.py).
typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The prepared GPU check: packs what a GPU host lacks into .gpu-check/ (under 64 MiB) and prints the one
# command to run there (scripts/gpu_check.py says what it measures).
gpu-check: $(STAMP)
	$(VENV)/bin/python scripts/gpu_check.py pack
