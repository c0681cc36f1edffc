"""`mpidl sweep`: a sweep file's tasks over the MPI ranks, then one table of results.

    mpirun -np 8 mpidl sweep sweeps/lr.yaml

Each rank sets torch to its own cores and runs tasks in this process, one at a time, each on a
world of one rank (`mpidl.world.world_for(MPI.COMM_SELF)`); rank 0 hands them out as ranks
come free (`dispatch`). A preemption signal (SIGUSR2, SIGTERM) stops the running tasks with
a checkpoint and starts no new one. Synthetic data the tasks read is generated once, by all ranks, before
the first task. Run again, the sweep skips the tasks it finished (failed ones too, unless
`retry_failed`) and resumes a task cut off mid-way from its checkpoint.
"""
from __future__ import annotations

import sys
import time

from mpidl.preemption import Preemption
from mpidl.sweep import dispatch, plan, results
from mpidl.sweep.task import cores_per_rank, run_task


def run_sweep(path: str, world, retry_failed: bool = False) -> list[dict]:
    """Run what is left of the sweep; the table (on rank 0; [] elsewhere)."""
    sweep, tasks = world.agree(lambda: plan.load(path))
    # torch once the sweep file is read: a typo in it fails in a fraction of a second
    import torch
    from mpi4py import MPI

    from mpidl.train.inputs import ensure_data
    from mpidl.world import world_for

    done = results.read_done(tasks) if world.rank == 0 else None
    if world.size > 1:
        done = world.comm.bcast(done, root=0)
    assert done is not None  # read by rank 0, which sent it to the others
    todo = [t.index for t in tasks
            if t.id not in done or (retry_failed and done[t.id].get("status") == "failed")]
    threads = cores_per_rank(world)
    torch.set_num_threads(threads)
    console = sys.stdout  # rank 0's tasks redirect sys.stdout while they run
    if world.rank == 0:
        print(f"sweep {sweep.name}: {len(tasks)} tasks, {len(tasks) - len(todo)} done before, {len(todo)} to run "
              f"on {world.size} rank(s) × {threads} thread(s); metric {sweep.metric} ({sweep.mode})", flush=True)

    prepared: set[str] = set()
    for i in todo:  # every rank takes part in writing each synthetic file once
        spec = tasks[i].spec
        key = repr(spec.data.files)
        if key not in prepared:
            prepared.add(key)
            ensure_data(spec, world)

    one = world_for(MPI.COMM_SELF)
    # The first optimizer a process builds imports torch._dynamo (seconds): pay it on every rank
    # at once here, not inside whichever tasks come first.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    finished = [0]
    t_start = time.time()

    def work(i: int) -> dict:
        if signals.requested():  # a preemption signal arrived between tasks: start no more
            return {"index": i, "status": "interrupted", "stop": True, "rank": world.rank, "seconds": 0.0}
        return run_task(tasks[i], one, world.rank, threads, sweep.metric)

    def record(result: dict) -> None:  # rank 0, one result at a time
        task = tasks[result["index"]]
        if result["status"] != "interrupted":
            results.write_result(task, result)
        done[task.id] = result
        finished[0] += 1
        value = result.get("metric")
        shown = (f"{sweep.metric} {value:.4g}" if isinstance(value, (int, float)) else
                 result.get("error", "") if result["status"] == "failed" else "")
        print(f"[{finished[0]}/{len(todo)}] {result['status']:<11} {task.id} {task.label}  {shown}  "
              f"(rank {result['rank']}, {result['seconds']:.1f} s)", file=console, flush=True)

    # SIGUSR2/SIGTERM (SLURM's warning before preemption or the time limit): a running task stops
    # after its step with a checkpoint (its own handler), and no rank starts another.
    with Preemption(one) as signals:
        dispatch.distribute(world, todo, work, record)
    if world.rank != 0:
        return []
    table = results.rows(sweep, tasks, results.read_done(tasks))
    results.write_table(sweep, table, {"ranks": world.size, "threads_per_rank": threads,
                                       "seconds_this_run": time.time() - t_start})
    print(results.render(table), flush=True)
    print(f"results: {sweep.out_dir / 'results.csv'}, {sweep.out_dir / 'results.json'}", flush=True)
    return table
