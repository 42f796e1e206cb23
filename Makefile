# Two commands for a new user:  `make demo` (the main job)  and  `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install demo test lint bench bench-gpu system-test-deps

$(PY):
	bash scripts/install.sh

install: $(PY)

demo: $(PY)
	bash scripts/demo.sh

# The SLURM tests start a real local cluster from Debian's packages (root + apt only;
# elsewhere those tests skip and say why).
system-test-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null) \
	  || echo "could not install slurm packages: the SLURM tests will skip"; fi

# Two pytest-xdist workers (TEST_WORKERS=0 runs in this process), a whole file per worker: the
# SLURM tests share one local cluster and its jobs (session fixtures of tests/test_slurm.py).
TEST_WORKERS ?= 2
test: $(PY) system-test-deps
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

lint: $(PY)
	$(VENV)/bin/ruff check deradiff train tests benchmarks

bench: $(PY)
	$(PY) benchmarks/realign.py

# On a GPU machine: full-size SD1.5/SDXL/SD3.5-medium shapes, random weights, one JSON (a few minutes).
bench-gpu: $(PY)
	$(PY) benchmarks/gpu.py --out benchmarks/results/gpu.json
