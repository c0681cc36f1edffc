"""Independent tasks over the MPI ranks, with dynamic load balancing.

    distribute(world, todo, work, record)

Rank 0 holds the queue. A rank that finishes a task sends rank 0 its result and receives the
next task (or None: nothing left), so a rank that drew short tasks simply takes more of them,
and the sweep ends when the last task does, whatever the mix of task lengths.

Rank 0 works too. A pure dispatcher would leave 1/N of the machine idle (half of it on two
ranks); instead a thread on rank 0 answers the other ranks' requests while rank 0's main
thread runs tasks. The thread polls with a non-blocking probe and sleeps between polls, so it
costs no core (a blocking receive in OpenMPI spins). This needs MPI_THREAD_MULTIPLE, which
`mpidl.init()` asks for; rank 0's own tasks take from the same queue under a lock.

A result with `"stop": True` (a task ended by a preemption signal) stops the handing out: the
ranks finish what they hold and the sweep ends, to resume later.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence

TAG = 7411
POLL_S = 0.002


class _Queue:
    def __init__(self, todo: Sequence[int], record: Callable[[dict], None]):
        self.pending = deque(todo)
        self.record = record
        self.stopped = False
        self.lock = threading.Lock()

    def take(self) -> Optional[int]:
        with self.lock:
            return None if self.stopped or not self.pending else self.pending.popleft()

    def done(self, result: dict) -> None:
        with self.lock:
            self.record(result)
            self.stopped = self.stopped or bool(result.get("stop"))


def _serve(comm, workers: int, queue: _Queue) -> None:
    """Rank 0's thread: answer each request with the next task until every worker got None."""
    from mpi4py import MPI

    status = MPI.Status()
    left = workers
    while left:
        if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG, status=status):
            time.sleep(POLL_S)
            continue
        source = status.Get_source()
        result = comm.recv(source=source, tag=TAG)
        if result is not None:
            queue.done(result)
        task = queue.take()
        comm.send(task, dest=source, tag=TAG)
        if task is None:
            left -= 1


def distribute(world, todo: Sequence[int], work: Callable[[int], dict], record: Callable[[dict], None]) -> None:
    """Run `work(i)` for every i in `todo`, each on whichever rank is free; `record` gets every
    result on rank 0 (one at a time). A collective: every rank calls it."""
    if world.rank == 0:
        queue = _Queue(todo, record)
        server = None
        if world.size > 1:
            server = threading.Thread(target=_serve, args=(world.comm, world.size - 1, queue), daemon=True,
                                      name="mpidl-sweep-dispatch")
            server.start()
        while (i := queue.take()) is not None:
            queue.done(work(i))
        if server is not None:
            server.join()
    else:
        result = None
        while True:
            world.comm.send(result, dest=0, tag=TAG)
            i = world.comm.recv(source=0, tag=TAG)
            if i is None:
                break
            result = work(i)
    world.barrier("the other ranks' last tasks")  # asleep: ranks done early leave their core
