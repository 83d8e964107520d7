# Set-up: `make demo` runs the embedded default end to end; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install chromium demo lint test test-fast test-gpu clean

install: $(STAMP)

# torch first (from the local wheel store when there is one), then deepspeed without
# build isolation so its setup sees that torch instead of fetching another.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Debian's chromium for the browser tests (tests/browser.py); only when none is on PATH. Needs root.
# The package lists are refreshed when they lack chromium or are too old to fetch it.
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-cache policy chromium | grep -q 'Candidate: [0-9]' && $(APT_CHROMIUM); } || \
	  { apt-get update -q && $(APT_CHROMIUM); }
	@echo "chromium: $$(command -v chromium || command -v chromium-browser)"

demo: install
	$(BIN)/cafe demo --config configs/demo.yaml

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/pytest tests -q

test-fast: install
	$(BIN)/pytest tests -q -m "not slow"

# the CUDA path on a machine with a GPU (DS_ACCELERATOR=cuda); skipped elsewhere
test-gpu: install
	DS_ACCELERATOR=cuda $(BIN)/pytest tests -q -m gpu

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache
