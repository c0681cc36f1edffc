"""Task-parallel sweeps: many small independent trainings over the MPI ranks (`mpidl sweep`).

plan      the sweep file, its checks, and the tasks it makes
dispatch  dynamic load balancing over the ranks (rank 0 hands out tasks, and works)
task      one task: the trainer in this process on a world of one rank
results   each task's result on disk (the sweep's state) and the sorted table
run       the whole: `run_sweep(path, world)`
"""
