# `make run` and `make test` work on a fresh machine: they create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: venv run test test-slow chaos claude-code lint bench clean

# `make run` installs only what serving needs; the test, lint and bench targets add the dev
# tools once, in a second step. pip prints its progress; a failed step stops make.
$(SERVE_STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "[1/2] creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "[2/2] installing llproxy and what serving needs into $(VENV)"
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -e .
	touch $@

$(STAMP): $(SERVE_STAMP)
	@echo "installing the test, lint and bench tools into $(VENV)"
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	touch $@

venv: $(STAMP)

run: $(SERVE_STAMP)
	$(BIN)/llproxy serve --verbose

test: $(STAMP)
	scripts/system-deps
	$(BIN)/python -m pytest

# The browser, pseudo-terminal and process-lifecycle suites (about a minute when idle).
test-slow: $(STAMP)
	scripts/system-deps
	$(BIN)/python -m pytest -m slow

# The slow attack runs, each bounded in count and time, printing its figures (about 5 min).
chaos: $(STAMP)
	scripts/system-deps
	$(BIN)/python -m pytest -m chaos tests/chaos -s

# The real Claude Code CLI through llproxy to a fake upstream (tests/test_claude_code.py).
# npm installs the pinned CLI into .cache/ on first use (a native binary, about 400 MB);
# it runs on Node 20 though the package asks for 22. Then the test takes a few seconds.
CLAUDE_CODE_VERSION := 2.1.332
CLAUDE_CODE_DIR := .cache/claude-code
CLAUDE_CODE_STAMP := $(CLAUDE_CODE_DIR)/.installed-$(CLAUDE_CODE_VERSION)

$(CLAUDE_CODE_STAMP):
	rm -rf $(CLAUDE_CODE_DIR)
	npm install --prefix $(CLAUDE_CODE_DIR) --save-exact --engine-strict=false \
	  --no-audit --no-fund @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	HOME=$(CLAUDE_CODE_DIR) $(CLAUDE_CODE_DIR)/node_modules/.bin/claude --version \
	  | grep -qx '$(CLAUDE_CODE_VERSION) (Claude Code)'
	touch $@

claude-code: $(STAMP) $(CLAUDE_CODE_STAMP)
	$(BIN)/python -m pytest -m claude_code tests/test_claude_code.py -rA

lint: $(STAMP)
	$(BIN)/ruff check llproxy tests scripts
	$(BIN)/ruff format --check llproxy tests scripts
	$(BIN)/mypy

# Installs wrk and nginx-light with apt-get when missing (as root). About 22 minutes on 2
# cores, then the streaming capacity run, about 5 more, then PostgreSQL against SQLite as
# the store, about 2 more (README, Benchmark).
bench: $(STAMP)
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench.py --capacity
	$(BIN)/python scripts/bench.py --only postgres

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .cache
