"""SLURM: `mpidl submit` through submitit or as a plain sbatch script, and requeue after preemption.

    script      the sbatch text: a spec's slurm: section -> #SBATCH lines, setup, launch line
    executor    submitit's SlurmExecutor with the section's parameters (one task per rank)
    task        TrainTask, what every rank runs under submitit (checkpoint() -> resubmission)
    rank        the mpirun launcher's entry: each rank takes its MPI rank before submitit starts
    requeue     after a preemption: requeue (up to requeue_limit) or say how to continue
    controller  the SLURM client commands (sbatch --test-only, scontrol), one-line errors
    submit      validate, write, check with the controller, submit; arrays of --set variants
    watch       --wait: follow rank 0's log, the final state without sacct, the failing rank
    examples    the scripts committed under slurm/ (python -m mpidl.slurm.examples rewrites them)
"""
