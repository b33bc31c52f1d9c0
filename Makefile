# musiclora: `make demo` runs the main job end to end, `make test` runs the tests.
# Both build .venv on a fresh machine first (scripts/setup.sh).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.musiclora-installed
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.musiclora/torch_extensions
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false
# tiny models on a shared 2-core machine: OpenMP spin-waiting made 1 s of generation take 6.8 s (0.6 s passive)
export OMP_WAIT_POLICY ?= PASSIVE
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
FAMILY ?= musicgen-melody

.PHONY: setup demo test test-wip test-unit lint clean
setup: $(STAMP)
$(STAMP): pyproject.toml constraints/cpu.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/musiclora demo --family $(FAMILY) $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -m "not wip" --timeout=2400 $(PYTEST_ARGS)

test-wip: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -m wip $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest tests/unit -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests ray_jobs serve bench examples

clean:
	rm -rf .musiclora/outputs .pytest_cache

# The adaptation study: a tiny base learns one style of the bundled corpus, then LoRA and full fine-tuning
# adapt it to a held-out style, 3 seeds; held-out loss and KAD as Markdown + JSON + a plot
# (not part of `make test`; about 10 min on 2 cores; README "The adaptation study").
.PHONY: adaptation-table
adaptation-table: $(STAMP)
	$(VENV)/bin/musiclora adaptation-table $(ADAPTATION_ARGS)
# Small-op models under OpenMP's default spin-waiting crawl on a shared machine (measured: 1 s of
# tiny MusicGen generation took 6.8 s with 2 spinning threads, 0.6 s with PASSIVE waiting).
adaptation-table: export OMP_WAIT_POLICY = PASSIVE
