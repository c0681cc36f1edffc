"""`python -m mpidl.slurm.rank FOLDER`: a submitit task started by `mpirun` inside an allocation.

Every rank mpirun starts inherits the batch shell's SLURM_PROCID=0, while submitit names a
task's pickles and logs, and picks the task that requeues, by SLURM_PROCID. Each rank
takes its MPI rank first, then hands over to submitit as `-m submitit.core._submit` would.
"""
from __future__ import annotations

import os
import sys

_FROM_MPI = {"SLURM_PROCID": "OMPI_COMM_WORLD_RANK", "SLURM_LOCALID": "OMPI_COMM_WORLD_LOCAL_RANK",
             "SLURM_NTASKS": "OMPI_COMM_WORLD_SIZE"}


def main(argv: list[str]) -> None:
    for slurm, mpi in _FROM_MPI.items():
        if mpi in os.environ:
            os.environ[slurm] = os.environ[mpi]
    from submitit.core.submission import process_job

    process_job(argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
