# Two commands matter: `make run` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where `make run` keeps its base model, adapters and job data.
RUN_DIR ?= runs/local

.PHONY: install test-tools run demo-train test lint fmt clean lock

$(STAMP): pyproject.toml requirements.lock clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e . -e clients/python
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests run for real: `prometheus` (promtool, prometheus) for the deploy checks and
# the end-to-end metrics test, `postgresql` (initdb, pg_ctl in /usr/lib/postgresql/<version>/bin)
# for the PostgreSQL job store tests, which start their own server in a temporary folder (as the
# package's `postgres` user when run as root), `chromium` + `chromium-driver` (/usr/bin/chromium,
# /usr/bin/chromedriver) for the web console's browser tests (Selenium drives it headless).
# Installed with apt-get when missing and we are root (or have password-less sudo); otherwise one
# line says what to install, and the tests that need it fail naming it.
test-tools:
	@missing=""; \
	if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then missing="prometheus"; fi; \
	if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then \
		missing="$$missing postgresql"; fi; \
	if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		missing="$$missing chromium chromium-driver"; fi; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	if [ "$$sudo" != none ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing Debian's$$missing package(s) for the tests"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null \
		|| echo "make: could not install Debian's$$missing; the tests that need them will fail" >&2; \
	else \
		echo "make: the tests need Debian's$$missing package(s): apt-get install$$missing" >&2; \
	fi

# Starts the service on http://127.0.0.1:8000. Without reachable distilgpt2 weights it comes
# up on random weights of the distilgpt2 architecture and says so loudly (see README).
run: $(STAMP)
	$(BIN)/python -m service --allow-random-weights --adapter-dir $(RUN_DIR)/adapters --data-dir $(RUN_DIR)/data

# Trains the demo adapter on examples/fixed_sentence.jsonl and prints where it is.
demo-train: $(STAMP)
	$(BIN)/python -m trainer demo --workdir $(RUN_DIR)

test: $(STAMP) test-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | sort > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
