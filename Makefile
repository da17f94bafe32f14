# The two commands of the README. Both create .venv themselves on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test test-fast lint fuzz faults scale soak bench clean browser

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

# What some tests use beyond the project's own packages, installed once: a client generator from
# PyPI in a venv of its own (its pins clash with the project's typer), and headless Chromium from
# Debian's packages (only as root; elsewhere the browser tests skip and say why).
TOOLS := $(VENV)/tools/.installed
$(TOOLS): | $(STAMP)
	$(PYTHON) -m venv $(VENV)/tools
	$(VENV)/tools/bin/pip install --quiet openapi-python-client==0.29.1 \
		&& touch $(TOOLS) || echo "make: could not install openapi-python-client; the generated-client test will skip"

browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& echo "make: installing Chromium (Debian's package) for the browser tests, once" \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "make: Chromium is missing and cannot be installed here; the browser tests will skip"

up: $(STAMP)
	$(BIN)/ingot up

# Two pytest processes (pytest-xdist), each with its own PostgreSQL, Redis and folders, each given
# whole test files (`--dist loadfile`: a file's shared worker and fixtures stay in one process).
TEST_PROCESSES ?= 2

test: $(STAMP) $(TOOLS) browser
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist loadfile

# The tests that start no worker process, fuzzing left to `make fuzz`: a quick check while working.
test-fast: $(STAMP)
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist loadfile -m "not worker and not fuzz"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The fuzz test at length: schemathesis with 300 examples an operation instead of 8.
fuzz: $(STAMP)
	INGOT_FUZZ_EXAMPLES=300 $(BIN)/pytest tests/test_fuzz.py --timeout=3600

# The fault suite at length: every fault five times over a load ten times larger (and 300 queued
# scenario runs behind each round's jobs instead of 20), PostgreSQL away for 30 s instead of 5, its
# table printed.
faults: $(STAMP)
	INGOT_FAULT_REPEAT=5 INGOT_FAULT_EVERY_ROW=1 INGOT_FAULT_ROWS=60000 INGOT_FAULT_BACKLOG=300 INGOT_FAULT_AWAY_SECONDS=30 $(BIN)/pytest tests/faults -s --timeout=3600

# Workers on three simulated hosts (network namespaces; needs root): jobs/s with 1, 2 and 3 hosts,
# then one host cut off mid-job.
SCALE_ROUNDS ?= 4
SCALE_ROWS ?= 100000
scale: $(STAMP)
	$(BIN)/python bench/scale.py --rounds $(SCALE_ROUNDS) --rows $(SCALE_ROWS)

# A steady mixed load for SOAK_MINUTES (10), then throughput, latency and what grew.
SOAK_MINUTES ?= 10
soak: $(STAMP)
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache
