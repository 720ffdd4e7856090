# The two commands that matter on a fresh machine:
#   make demo   set everything up, then train (and evaluate) on the embedded synthetic dataset, 2 ranks
#   make test   set everything up (cached), then run the test suite, multi-rank tests included
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup test demo bench clean-venv

setup:
	bash scripts/setup.sh

# Two pytest-xdist workers, a test file at a time on each (--dist loadfile): the tests of a file share its
# fixtures (one PBS per machine, module-scoped rank runs), and a worker's test cluster is its own.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder --durations=15

demo: setup
	bash jobs/local/demo.sh

bench: setup
	$(PY) benchmarks/bench_cgbn.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_train.py

# 8, 16 and 32 ranks as simulated hosts of 8 on this machine: CGBN groups, gradients, sampler coverage,
# a 32-rank checkpoint resumed at 32; start-up, step time and memory per rank. ~11 min on 2 idle cores,
# ~13 GB of memory at 32 ranks: not part of `make test`.
.PHONY: rehearse
rehearse: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/rehearse_scale.py

# The files an offline GPU node lacks (Horovod sdist, Open MPI, pycocotools and cffi wheels for its
# Python 3.12), downloaded here into .gpu_carry/ (~11 MB): carry or copy it there, then run
# `bash scripts/gpu_env.sh` on the node (docs/offline_gpu_nodes.md).
.PHONY: gpu-carry
gpu-carry:
	bash scripts/gpu_env.sh carry

clean-venv:
	rm -rf $(VENV)
