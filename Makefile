# Two commands for a new user:  `make demo` (the main job)  and  `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install demo test lint bench

$(PY):
	bash scripts/install.sh

install: $(PY)

demo: $(PY)
	bash scripts/demo.sh

test: $(PY)
	$(PY) -m pytest -q -ra

lint: $(PY)
	$(VENV)/bin/ruff check deradiff train tests benchmarks

bench: $(PY)
	$(PY) benchmarks/realign.py
