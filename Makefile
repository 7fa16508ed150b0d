# Two commands matter: `make run` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where `make run` keeps its base model, adapters and job data.
RUN_DIR ?= runs/local

.PHONY: install run demo-train test lint fmt clean lock

$(STAMP): pyproject.toml requirements.lock clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e . -e clients/python
	touch $(STAMP)

install: $(STAMP)

# Starts the service on http://127.0.0.1:8000. Without reachable distilgpt2 weights it comes
# up on random weights of the distilgpt2 architecture and says so loudly (see README).
run: $(STAMP)
	$(BIN)/python -m service --allow-random-weights --adapter-dir $(RUN_DIR)/adapters --data-dir $(RUN_DIR)/data

# Trains the demo adapter on examples/fixed_sentence.jsonl and prints where it is.
demo-train: $(STAMP)
	$(BIN)/python -m trainer demo --workdir $(RUN_DIR)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | sort > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
