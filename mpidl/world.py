"""Who am I: rank, size, local rank, device, and how the job was launched.

One place decides this. MPI itself is the authority once initialised; the launcher's
environment is only read to name the launcher and to guess before MPI starts. Under
`mpirun` inside an sbatch allocation every rank inherits the batch script's stale
`SLURM_PROCID=0`, so SLURM variables count only inside a job step (`SLURM_STEP_ID`).

`init()` also arms fail-fast: an uncaught exception on any rank prints that rank's
traceback once and aborts the whole job, so no other rank is left waiting in a collective.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Optional, TypeVar

from mpidl.errors import EXIT_BAD_INPUT, BadInput, Fault

T = TypeVar("T")

SINGLE, MPIRUN, SRUN = "single", "mpirun", "srun"


def detect_launcher(env: Mapping[str, str]) -> str:
    """Name the launcher from the environment alone (pure; testable without MPI)."""
    if "OMPI_COMM_WORLD_RANK" in env or ("PMI_RANK" in env and "SLURM_STEP_ID" not in env):
        return MPIRUN
    if "SLURM_STEP_ID" in env and ("PMIX_RANK" in env or "SLURM_PROCID" in env):
        return SRUN
    if "PMIX_RANK" in env:
        return MPIRUN
    return SINGLE


def env_rank(env: Mapping[str, str]) -> tuple[int, int, int, int]:
    """(rank, size, local_rank, local_size) as the launcher's environment tells them (pure).

    Order of trust: OMPI_COMM_WORLD_* -> PMIX_RANK -> PMI_RANK -> SLURM_* (only inside a
    job step). Missing pieces default to a single process.
    """
    def num(*keys: str, default: int) -> int:
        for k in keys:
            if k in env and env[k].strip().lstrip("-").isdigit():
                return int(env[k])
        return default

    in_step = "SLURM_STEP_ID" in env
    slurm = ("SLURM_PROCID",) if in_step else ()
    slurm_size = ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS") if in_step else ()
    slurm_local = ("SLURM_LOCALID",) if in_step else ()
    rank = num("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", *slurm, default=0)
    size = num("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", *slurm_size, default=1)
    if "OMPI_COMM_WORLD_RANK" not in env and "PMIX_RANK" in env and in_step:
        size = num("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "PMI_SIZE", default=size)
    local_rank = num("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", *slurm_local, default=0)
    local_size = num("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=1)
    if in_step and "OMPI_COMM_WORLD_LOCAL_SIZE" not in env and "SLURM_TASKS_PER_NODE" in env:
        # e.g. "2(x3)" or "2,1": the first node's count is the common case.
        first = env["SLURM_TASKS_PER_NODE"].split(",")[0].split("(")[0]
        local_size = int(first) if first.isdigit() else local_size
    return rank, size, local_rank, local_size


# A machine where torch can see a GPU has one of these: NVIDIA's driver (its /proc entry, its
# control device), WSL's GPU (dxg), ROCm's (kfd, which torch also calls cuda). Without any, the
# device is `cpu`, and torch (seconds of CPU to import) is not imported just to be asked.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def pick_device(local_rank: int) -> str:
    """`cuda:<local_rank mod visible GPUs>` when CUDA works, else `cpu`."""
    if not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def shared_gpu_warning(local_size: int, gpus: int) -> Optional[str]:
    """What to tell the user when ranks on a node outnumber its visible GPUs (pure)."""
    if gpus <= 0 or local_size <= gpus:
        return None
    return (f"{local_size} ranks on this node share {gpus} visible GPU(s): ranks on one GPU contend for "
            "it and NCCL refuses two ranks on the same device; launch one rank per GPU "
            "(e.g. srun --ntasks-per-node=<GPUs>, or mpirun -npernode <GPUs>)")


@dataclass(frozen=True)
class World:
    """This process's place in the job. Get it from `mpidl.init()`."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    device: str
    launcher: str
    comm: Any = field(repr=False, compare=False, default=None)
    node_comm: Any = field(repr=False, compare=False, default=None)  # the ranks on this node

    @property
    def across_nodes(self) -> bool:
        """Whether the job spans more than one node."""
        return self.local_size < self.size

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self, what: str = "a barrier") -> None:
        """Block until every rank arrives (a collective); `what` for the watchdog.

        For waits outside the training step (rank 0 writes a checkpoint, a rank evaluates more
        batches): a rank that arrives early sleeps instead of spinning in MPI's progress loop,
        which takes a whole core whether it yields or not, and leaves it to the ranks it waits for.
        """
        if self.comm is not None and self.size > 1:
            from mpidl import watchdog

            with watchdog.waiting(what):
                wait_quietly(self.comm)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("comm", "node_comm")}

    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it raises BadInput anywhere, raise it everywhere.

        For checks of user input that every rank performs: all ranks then exit 2 together
        with the same one-line message instead of a mix of errors and a hang.
        """
        err: Optional[str] = None
        result: Any = None
        try:
            result = fn()
        except BadInput as e:
            err = str(e)
        if self.comm is None or self.size == 1:
            if err is not None:
                raise BadInput(err)
            return result
        self.barrier("the ranks' agreement on a check of the input")  # asleep while rank 0 reads a file
        from mpidl import watchdog

        with watchdog.waiting("the ranks' agreement on a check of the input"):
            errors = self.comm.allgather(err)
        for r, message in enumerate(errors):
            if message is not None:
                raise BadInput(message, collective=True, origin=r)
        return result

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
        os._exit(code)


_world: Optional[World] = None
_lock = threading.Lock()


def init(fail_fast: bool = True) -> World:
    """Initialise MPI (once) and return this process's World.

    Works as a lone process, under `mpirun -np N`, and under `srun --mpi=pmix`.
    """
    global _world
    with _lock:
        if _world is not None:
            return _world
        launcher = detect_launcher(os.environ)
        from mpidl import net

        try:
            net.apply()  # before MPI starts: it reads its interface choice then
            net_error = None
        except BadInput as e:
            net_error = e  # reported by every rank together, once MPI is up
        comm = _mpi_comm()
        rank, size = comm.Get_rank(), comm.Get_size()
        host = socket.gethostname()
        node = _node_comm(comm, host)
        local_rank, local_size = node.Get_rank(), node.Get_size()
        _world = World(
            rank=rank,
            size=size,
            local_rank=local_rank,
            local_size=local_size,
            host=host,
            device=pick_device(local_rank),
            launcher=launcher,
            comm=comm,
            node_comm=node,
        )
        from mpidl import log

        logger = log.setup(rank, size)
        if _world.device.startswith("cuda") and rank == 0:  # ranks per node are alike: say it once
            import torch

            warning = shared_gpu_warning(local_size, torch.cuda.device_count())
            if warning:
                logger.warning(warning)
        if fail_fast:
            _arm_fail_fast(_world)
        if os.environ.get(net.VAR):  # set alike on every rank: a bad value fails on all together
            _world.agree(lambda: _raise(net_error))
        return _world


def world_for(comm, device: Optional[str] = None) -> World:
    """A World over `comm`, a communicator of the job's MPI (a collective over `comm`).

    For work that runs on part of the job: `world_for(MPI.COMM_SELF)` is a world of one for
    a sweep's task, which a Trainer takes in place of the global World. Fail-fast stays
    armed for the whole job; `device` defaults to this rank's device in the whole job.
    """
    base = init()
    node = _node_comm(comm, base.host)
    return World(rank=comm.Get_rank(), size=comm.Get_size(), local_rank=node.Get_rank(), local_size=node.Get_size(),
                 host=base.host, device=device or base.device, launcher=base.launcher, comm=comm, node_comm=node)


def _raise(error: Optional[BaseException]) -> None:
    if error is not None:
        raise error


def _node_comm(comm, host: str):
    """The ranks on this node: those that share memory with this one and its host name.

    MPI's shared-memory split follows the launcher's idea of a node (one orted, one slurmd);
    ranks on one kernel but in different containers or network namespaces share memory yet
    are different hosts to everything else (node-local staging, rendezvous addresses), so the
    host name splits them further.
    """
    shared = comm.Split_type(_mpi().COMM_TYPE_SHARED, key=comm.Get_rank())
    hosts = shared.allgather(host)
    if len(set(hosts)) == 1:
        return shared
    node = shared.Split(color=sorted(set(hosts)).index(host), key=shared.Get_rank())
    shared.Free()
    return node


def current() -> Optional[World]:
    """The World made by `init()`, or None before it."""
    return _world


def wait_quietly(comm, longest_pause: float = 0.02) -> None:
    """A barrier of `comm` that sleeps between looks at a nonblocking one: pauses double from
    0.1 ms up to `longest_pause`, so a short wait costs little more than a blocking barrier."""
    request = comm.Ibarrier()
    pause = 0.0001
    while not request.Test():
        time.sleep(pause)
        pause = min(2 * pause, longest_pause)


def _mpi():
    from mpi4py import MPI

    return MPI


# What `mpirun` needs where mpidl develops and tests itself (a container, as root): root's consent
# and no cross-memory attach (containers forbid it); OVERSUBSCRIBE lets more ranks than cores
# share them. The tests, benchmarks and the Makefile (its own copy: make reads no Python) set them.
LOCAL_MPIRUN_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                    "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}
OVERSUBSCRIBE_ENV = {"OMPI_MCA_rmaps_base_oversubscribe": "1"}

# Open MPI settings every rank takes unless its environment says otherwise (read at MPI_Init).
# A rank waiting in MPI gives its core away (sched_yield in the progress loop) instead of spinning:
# Horovod's background thread drives MPI beside the training thread, and on CPU nodes where every
# core has a rank its spin took the core from backward (benchmarks/bench_horovod_cpu.py).
MPI_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}


def _mpi_comm():
    import mpi4py

    for key, value in MPI_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Threads: the prefetcher and Horovod's background thread live beside MPI calls.
    mpi4py.rc.thread_level = "multiple"
    return _mpi().COMM_WORLD


def _prefix(rank: int, text: str) -> str:
    return "".join(f"[rank {rank}] {line}\n" for line in text.rstrip("\n").splitlines())


def report_and_abort(world: World, exc: BaseException) -> None:
    """Print `exc` once for this rank and end the whole job.

    BadInput prints one line and exits 2 (on every rank when the error is collective);
    anything else prints its traceback and aborts with 1.
    """
    if isinstance(exc, BadInput):
        if not exc.collective or world.rank == 0:
            who = exc.origin if exc.origin is not None else world.rank
            where = f"[rank {who}] " if world.size > 1 else ""
            sys.stderr.write(f"{where}error: {exc}\n")
        sys.stderr.flush()
        if exc.collective or world.size == 1:
            _exit_together(world, EXIT_BAD_INPUT)
        world.abort(EXIT_BAD_INPUT)
    if isinstance(exc, Fault):  # a finding about the run or its machine, not a bug: one line, no traceback
        sys.stderr.write(f"[rank {world.rank}] error: {exc}\n")
        world.abort(1)
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write(_prefix(world.rank, "interrupted"))
        world.abort(130)
    if world.size > 1 and _echoes_a_lost_peer(exc):
        # The collective failed because another rank died: its abort is on its way and ends this
        # rank too. Give it a moment, so the job shows the first error alone; a peer lost with no
        # abort behind it (a node cut off) is reported after the wait.
        time.sleep(ECHO_GRACE_S)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(_prefix(world.rank, tb))
    world.abort(1)


# What a collective raises when a peer's process is gone (Gloo's TCP pairs, Horovod).
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Horovod has been shut down")
ECHO_GRACE_S = 3.0


def _echoes_a_lost_peer(exc: BaseException) -> bool:
    seen: Optional[BaseException] = exc
    for _ in range(10):  # the chain of causes, a few deep (a chain may loop)
        if seen is None:
            break
        if any(words in str(seen) for words in _LOST_PEER):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_before_finalize: list[Callable[[], None]] = []


def before_finalize(fn: Callable[[], None]) -> None:
    """Run `fn` before MPI is finalised when all ranks leave together (e.g. `hvd.shutdown`:
    Horovod's background thread must stop before MPI_Finalize, or the exit turns into an abort)."""
    _before_finalize.append(fn)


def _exit_together(world: World, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for fn in reversed(_before_finalize):
            try:
                fn()
            except Exception:
                pass  # leaving anyway; the exit code is what matters
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    finally:
        os._exit(code)


def _arm_fail_fast(world: World) -> None:
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, SystemExit):
            return
        report_and_abort(world, exc)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        report_and_abort(world, args.exc_value)

    sys.excepthook = hook
    threading.excepthook = thread_hook

    from mpidl import preemption

    # Armed for preemption (`mpidl train`), SIGTERM is recorded until training can stop at a step.
    if threading.current_thread() is threading.main_thread() and not preemption.armed():
        signal.signal(signal.SIGTERM, lambda signum, frame: abort_on_signal(signum))


def abort_on_signal(signum: int) -> None:
    """End the whole job now because this rank received `signum`."""
    world = _world
    rank = world.rank if world is not None else 0
    sys.stderr.write(_prefix(rank, f"received {signal.Signals(signum).name}, ending the job"))
    if world is None:
        sys.stderr.flush()
        os._exit(128 + signum)
    world.abort(128 + signum)
