# lfqa: every command a person runs. `make train` and `make test` set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOB ?= jobs/tiny-cpu.yaml
ACCELERATE_CONFIG ?= accelerate_configs/cpu.yaml
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
# The stamp is refreshed whenever pyproject.toml changes, so set-up is a no-op when nothing changed.
STAMP := $(VENV)/.lfqa-installed

.PHONY: setup train test bench lint clean help

help:
	@echo "make train    set up, then train $(JOB) with accelerate ($(ACCELERATE_CONFIG)); ARGS='key=value ...'"
	@echo "make test     set up, then run the whole test suite"
	@echo "make bench    set up, then run the throughput benchmark (benchmarks/run.py); BENCH_ARGS='...'"
	@echo "make lint     ruff"
	@echo "make clean    remove the virtual environment, caches and runs"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

train: $(STAMP)
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) -m lfqa.train $(JOB) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lfqa tests

clean:
	rm -rf $(VENV) .cache runs .pytest_cache build *.egg-info
