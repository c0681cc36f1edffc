"""Data-parallel training: `mpidl train JOB.yaml` (cli), the loop (trainer), checkpoints,
models and the gradient-averaging backends (horovod, ddp, mpi)."""
