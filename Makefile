# The two entry points a newcomer needs; both set up first (idempotent, seconds when done).
SHELL := /bin/bash
VENV  := .venv
NP    ?= 2
PYTEST_ARGS ?=

# OpenMPI refuses root without these; the others let 3 ranks share 2 cores and work in
# containers that forbid cross-process memory access.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
export OMPI_MCA_btl_vader_single_copy_mechanism := none

.PHONY: setup demo test test-quick doctor clean gpu-check-prepare gpu-check

setup:
	bash scripts/setup.sh

# The main job on its embedded default: synthetic images generated on first use.
demo: setup
	mpirun -np $(NP) $(VENV)/bin/mpidl train jobs/demo.yaml --require-target --overwrite

# pytest-xdist workers, one per core and one more (TEST_WORKERS=N for N, 0 for none): the tests
# that use a SLURM cluster share one worker (tests/conftest.py), so each cluster starts once, and
# that worker mostly waits for SLURM; while it or a test sleeps, the others compute.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: setup
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

# What needs no launcher: no mpirun, no SLURM, no emulated nodes, no Horovod, nothing slow.
QUICK := not mpi and not slurm and not multinode and not horovod and not slow
test-quick: setup
	$(VENV)/bin/python -m pytest -q -m "$(QUICK)" $(PYTEST_ARGS)

doctor: setup
	$(VENV)/bin/mpidl doctor

clean:
	rm -rf $(VENV) runs .pytest_cache

# The GPU verification (benchmarks/gpu_check.sh): prepare here, with network; run on a CUDA
# machine without it: results and logs under $(OUT) (default gpu-check-out).
gpu-check-prepare: setup
	bash benchmarks/gpu_check.sh prepare

gpu-check:
	bash benchmarks/gpu_check.sh run $(or $(OUT),gpu-check-out)
