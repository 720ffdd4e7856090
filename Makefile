# The two commands that matter on a fresh machine:
#   make demo   set everything up, then train (and evaluate) on the embedded synthetic dataset, 2 ranks
#   make test   set everything up (cached), then run the test suite, multi-rank tests included
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup test demo bench clean-venv

setup:
	bash scripts/setup.sh

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

demo: setup
	bash jobs/local/demo.sh

bench: setup
	$(PY) benchmarks/bench_cgbn.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_train.py

clean-venv:
	rm -rf $(VENV)
