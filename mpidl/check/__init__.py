"""`mpidl check JOB.yaml`: the job on a few local CPU ranks, a few steps, before it burns an allocation.

runner.py runs the checks and prints the table; data.py makes the small slice of the job's
data (or a stand-in of its shapes); probe.py is what every rank runs: `mpidl train` with one
callback that reports what it saw.
"""

# Set by the runner for each rank of a run: where its probe writes, and the step to signal at.
DIR_ENV, SIGNAL_ENV = "MPIDL_CHECK_DIR", "MPIDL_CHECK_SIGNAL_AT"
