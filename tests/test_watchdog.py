"""The progress watchdog and time-based checkpoints under real mpirun.

A rank that makes no progress for `watchdog_s` ends the job with one line naming it, its host and
what it was doing, then its Python stack, exit 4, on every backend and in your own loop
(`mpidl.Run`); nothing that is slow but progressing (a long evaluation, a slow checkpoint write, a
slow first batch, torch.compile, staging, a cold file system) ends it. Faults and slowness are
made by the launched rank script itself: a forward hook, or a function of mpidl's monkeypatched
in that process (the file a checkpoint is written to, the reads of the data file). The `watchdog`
unit tests at the end check the one line's wording without MPI.

Timing: nothing here asserts how soon; `mpirun`'s timeout only keeps a hang from stalling CI.
benchmarks/bench_faults.py measures the seconds from a fault to the job's end.
"""
from __future__ import annotations

import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import mpirun, pycode
from test_train import BACKENDS, final_weights, write_job
from mpidl import watchdog

HOST = socket.gethostname()

RANK = """
import json, os, sys, time, mpidl
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

w = mpidl.init()
LAST = w.size - 1


class Forward(Callback):
    # fn(number of this forward call on this rank, module) before every forward pass
    def __init__(self, fn):
        self.fn = fn

    def on_start(self, trainer):
        calls = [0]

        def hook(module, args):
            calls[0] += 1
            self.fn(calls[0], module)

        trainer.net.register_forward_pre_hook(hook)


class SlowFile:
    # the checkpoint's file, each piece written taking `delay` seconds
    def __init__(self, f, delay):
        self.f, self.delay = f, delay

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        time.sleep(self.delay)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

def patch(owner, name, value):
    # undone after the run: the next run of this launch sees mpidl as it is
    patched.append((owner, name, owner.__dict__.get(name, patch)))
    setattr(owner, name, value)


def arm(case, W):  # the callbacks that make `case`, with mpidl's functions patched as it needs
    callbacks = []
    if case == "stuck-step":          # the last rank's 7th forward pass never returns (its process lives)
        callbacks.append(Forward(lambda n, m: w.rank == LAST and n == 7 and time.sleep(600)))
    elif case == "stuck-read":        # the last rank's file system stops answering once training has begun
        from mpidl.data import source
        began, segments = [False], source.Reader._segments

        def hung(self, *args):
            if w.rank == LAST and began[0]:  # after the first step, which may take 10 W: the watchdog's W applies
                time.sleep(600)
            return segments(self, *args)
        patch(source.Reader, "_segments", hung)
        callbacks.append(Forward(lambda n, m: began.__setitem__(0, True)))
    elif case == "stuck-checkpoint":  # rank 0's writes to the checkpoint's file never return
        from mpidl.train import checkpoint
        patch(checkpoint, "open", lambda path, mode: SlowFile(open(path, mode), 600 if w.rank == 0 else 0))
    elif case == "slow-eval":         # rank 0 evaluates slowly: 0.9 W a held-out batch, 13 batches
        callbacks.append(Forward(lambda n, m: w.rank == 0 and not m.training and time.sleep(0.9 * W)))
    elif case == "slow-checkpoint":   # each piece of a checkpoint takes 0.15 W to write (rank 0 writes)
        from mpidl.train import checkpoint
        patch(checkpoint, "open", lambda path, mode: SlowFile(open(path, mode), 0.15 * W))
    elif case == "slow-first-batch":  # the last rank's first batch takes 3 W (a cold file, a lazy transform)
        from mpidl.data import loader
        batches, first = loader.ShardedLoader.__iter__, [True]

        def slow_first(self):
            for batch in batches(self):
                if first[0] and not self.evaluation and w.rank == LAST:
                    time.sleep(3 * W)
                first[0] = False
                yield batch
        patch(loader.ShardedLoader, "__iter__", slow_first)
    elif case == "slow-compile":      # each compilation takes 12 W (more than the first step's 10 W)
        import torch._inductor.compile_fx as cfx
        compile_fx = cfx.compile_fx

        def slow_compile(*args, **kwargs):
            time.sleep(12 * W)
            return compile_fx(*args, **kwargs)
        patch(cfx, "compile_fx", slow_compile)
    elif case == "slow-staging":      # staging reads its first 12 blocks in 0.3 W each: 3.6 W in all
        from mpidl.data import source, staging
        read, copy, copying, blocks = source.Reader.read, staging.Staging._copy, [False], [0]

        def slow_read(self, *args):
            if copying[0] and blocks[0] < 12:
                blocks[0] += 1
                time.sleep(0.3 * W)
            return read(self, *args)

        def flagged_copy(self, *args):
            copying[0] = True
            try:
                return copy(self, *args)
            finally:
                copying[0] = False
        patch(source.Reader, "read", slow_read), patch(staging.Staging, "_copy", flagged_copy)
    elif case == "cold-reads":        # training's reads are slow: a window (2 W) arrives in tiny pieces
        from mpidl.data import loader, source
        patch(source, "PIECE_BYTES", 64)
        segments, pipeline, training = source.Reader._segments, loader._Pipeline.__init__, [False]

        def cold(self, *args):
            if training[0]:
                time.sleep(0.05 * W)
            return segments(self, *args)

        def first_pass(self, *args, **kwargs):
            training[0] = True  # the label scan before it reads at full speed
            pipeline(self, *args, **kwargs)
        patch(source.Reader, "_segments", cold), patch(loader._Pipeline, "__init__", first_pass)
    return callbacks


# each run in turn: [case, job, sets]; a stuck case ends the launch (the watchdog's exit 4)
for case, job, sets in json.loads(sys.argv[1]):
    patched = []
    spec = load_spec(job, sets)
    train(spec, callbacks=arm(case, spec.watchdog_s))
    for owner, name, old in reversed(patched):
        delattr(owner, name) if old is patch else setattr(owner, name, old)
    ranks = w.comm.gather(w.rank, root=0)  # one writer: two ranks' lines at once may interleave in mpirun's output
    if w.rank == 0:
        print("finished", case, len(ranks), flush=True)
"""


def run_case(tmp_path: Path, case: str, *sets: str, ranks: int = 2, timeout: float = 300, **over):
    job = write_job(tmp_path, **over)
    return mpirun(ranks, pycode(RANK) + [json.dumps([[case, str(job), list(sets)]])], timeout=timeout)


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "error: watchdog:" in ln]
    assert lines, stderr[-3000:]
    return lines[0]


def stack_of(stderr: str, rank: int) -> str:
    return "\n".join(ln for ln in stderr.splitlines() if ln.startswith(f"[rank {rank}]   File ")
                     or ln.startswith(f"[rank {rank}] Thread "))


# ------------------------------------------------------------------ a stuck rank ends the job, named
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stuck_step_ends_the_job_naming_the_rank(tmp_path, backend):
    """The mpi backend used to wait forever here (benchmarks/results/faults-cpu2.json)."""
    r = run_case(tmp_path, "stuck-step", "watchdog_s=3", backend=backend, epochs=5)
    assert r.returncode == 4, r.output[-3000:]
    assert "finished" not in r.stdout
    line = error_line(r.stderr)
    waits = "the gradient allreduce (DDP, inside backward)" if backend == "ddp" else "the gradient allreduce of step 7"
    assert re.fullmatch(rf"\[rank 1\] error: watchdog: rank 1 on {HOST} made no progress for (\d+) s, in "
                        rf"forward/backward of step 7; rank 0 on {HOST} waits in {re.escape(waits)} "
                        r"\(watchdog_s 3\); ending the job \(exit 4\)", line), line
    assert int(re.search(r"for (\d+) s", line).group(1)) >= 3
    stack = stack_of(r.stderr, 1)
    assert re.search(r"\[rank 1\] Thread 0x[0-9a-f]+ \(main\)", stack), r.stderr[-3000:]
    assert "in hook" in stack and "in train_step" in stack  # where it hangs: the script's hook, in a step


def test_a_read_that_never_returns_is_named_as_the_data_wait(tmp_path):
    r = run_case(tmp_path, "stuck-read", "watchdog_s=3", epochs=5)
    assert r.returncode == 4, r.output[-3000:]
    line = error_line(r.stderr)
    assert re.search(rf"rank 1 on {HOST} made no progress for \d+ s, in waiting for a batch of step \d+; "
                     rf"rank 0 on {HOST} waits in ", line), line
    assert "in hung" in stack_of(r.stderr, 1)  # the reader's thread, stuck in the file system


def test_a_checkpoint_write_that_never_returns_is_named(tmp_path):
    r = run_case(tmp_path, "stuck-checkpoint", "watchdog_s=3")
    assert r.returncode == 4, r.output[-3000:]
    line = error_line(r.stderr)
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-000000056.pt"
    assert re.search(rf"rank 0 on {HOST} made no progress for \d+ s, in writing {re.escape(str(ckpt))}; "
                     rf"rank 1 on {HOST} waits in the barrier while rank 0 writes the checkpoint of step 56", line), line
    assert not ckpt.exists()  # nothing half-written under the checkpoint's name


OWN_LOOP = """
import sys, time, torch, mpidl
from torch import nn

world = mpidl.init()
out, data, case, W = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
torch.manual_seed(0)
loader = mpidl.ShardedLoader(mpidl.H5Source(data), world, batch_size=16)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
with mpidl.Run(out, model, optimizer, loader, epochs=2, backend="mpi", watchdog_s=W) as run:
    for epoch in run.epochs():
        for x, y in run.batches():
            if case == "stuck" and world.rank == 1 and run.position.global_step == 4:
                time.sleep(600)   # the 5th step of your loop never ends on rank 1
            loss = nn.functional.cross_entropy(run.model(x), y)
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            run.log(loss=loss)
        if case == "long-own-eval":   # your own evaluation after each epoch: 12 W (LONG is 10 W), saying so
            for _ in range(12):
                time.sleep(W)
                run.progress("my evaluation")
ranks = world.comm.gather(world.rank, root=0)  # one writer: two ranks' lines at once may interleave
if world.rank == 0:
    print("finished", len(ranks), flush=True)
"""


def test_your_own_loop_stuck_is_named(tmp_path):
    data = tmp_path / "tab.h5"
    make_tabular(data)
    r = mpirun(2, pycode(OWN_LOOP) + [str(tmp_path / "run"), str(data), "stuck", "3"], timeout=300)
    assert r.returncode == 4, r.output[-3000:]
    line = error_line(r.stderr)
    assert re.search(rf"\[rank 1\] error: watchdog: rank 1 on {HOST} made no progress for \d+ s, in your step 5 "
                     rf"\(forward, backward\); rank 0 on {HOST} waits in the gradient allreduce of step 5", line), line
    assert "in <module>" in stack_of(r.stderr, 1)


def test_your_own_long_work_between_epochs_says_it_progresses(tmp_path):
    data = tmp_path / "tab.h5"
    make_tabular(data)
    r = mpirun(2, pycode(OWN_LOOP) + [str(tmp_path / "run"), str(data), "long-own-eval", "1"],
               timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    assert "finished 2\n" in r.stdout  # both ranks


def make_tabular(path: Path) -> None:
    from mpidl.data.synth import synth_tabular

    synth_tabular(str(path), 2000, features=8, rule="nonlinear", classes=3)


# ------------------------------------------------------------------ slow but progressing: no alarm
NO_ALARM = [
    # more than the first held-out batch's 10 W in all, while rank 1 waits for rank 0
    ("slow-eval", ["watchdog_s=2", "data.val_fraction=0.2"], {"epochs": 1}),
    ("slow-checkpoint", ["watchdog_s=2"], {"epochs": 1}),
    ("slow-first-batch", ["watchdog_s=2"], {"epochs": 1}),
    ("cold-reads", ["watchdog_s=2"], {"steps": 30}),
    ("slow-compile", ["watchdog_s=1", "model.compile=true"], {"epochs": 1}),
]


# The slow cases mostly sleep, so three launches run them side by side, a few cases each in turn
# (about a minute each here, against three for one launch of all six); torch.compile's case comes
# last in its launch, which keeps what it compiled.
NO_ALARM_LAUNCHES = [["slow-first-batch", "slow-compile"], ["cold-reads", "slow-staging"],
                     ["slow-eval", "slow-checkpoint"]]


@pytest.fixture(scope="module")
def no_alarm(tmp_path_factory):
    """The launches that ran every slow-but-progressing case (each in a folder of its own), and
    whether each case finished on both ranks."""
    runs = {}
    for case, sets, over in [*NO_ALARM, ("slow-staging", ["watchdog_s=2"], {"epochs": 1})]:
        tmp = tmp_path_factory.mktemp(case)
        if case == "slow-staging":
            sets = [*sets, f"data.stage_dir={tmp / 'stage'}"]
        runs[case] = [case, str(write_job(tmp, **over)), sets]
    assert sorted(runs) == sorted(c for launch in NO_ALARM_LAUNCHES for c in launch)

    def launch(cases):
        return mpirun(2, pycode(RANK) + [json.dumps([runs[c] for c in cases])], timeout=900)

    with ThreadPoolExecutor(len(NO_ALARM_LAUNCHES)) as pool:
        ran = list(pool.map(launch, NO_ALARM_LAUNCHES))
    ended = {}
    for r in ran:
        assert r.returncode == 0, r.output[-3000:]
        assert "watchdog" not in r.stderr, r.stderr[-3000:]
        ended.update(line.split()[1:] for line in r.stdout.splitlines() if line.startswith("finished "))
    return {case: int(ended.get(case, 0)) for case in runs}


@pytest.mark.parametrize("case", [c for c, _, _ in NO_ALARM])
def test_slow_but_progressing_is_no_hang(no_alarm, case):
    assert no_alarm[case] == 2


def test_slow_staging_is_no_hang(no_alarm):
    assert no_alarm["slow-staging"] == 2


# ------------------------------------------------------------------ checkpoints every so many minutes
SKEWED = """
import json, sys, time, mpidl
from mpidl.spec import load_spec
from mpidl.train import run as run_module
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

w = mpidl.init()


class Clock:
    # this rank's clock: rank 1's runs ten times as fast as rank 0's (ranks' clocks differ)
    perf_counter = staticmethod(time.perf_counter)
    sleep = staticmethod(time.sleep)

    @staticmethod
    def monotonic():
        return time.monotonic() * (10 if w.rank == 1 else 1)


class Paced(Callback):
    def after_step(self, trainer):
        time.sleep(0.01)


run_module.time = Clock
for job, sets in json.loads(sys.argv[1]):  # in turn, by the same ranks
    train(load_spec(job, sets), callbacks=[Paced()])
"""


def test_checkpoints_every_so_many_minutes_agreed_by_ranks_with_different_clocks(tmp_path):
    """Rank 1's clock runs fast, so it wants a checkpoint every few steps, rank 0 rarely: both
    write the same ones (a checkpoint is a collective: ranks that disagreed would hang), and
    the training is the same as without them."""
    ref = write_job(tmp_path, epochs=1, output=str(tmp_path / "ref"))
    timed = write_job(tmp_path, epochs=1, output=str(tmp_path / "timed"),
                      checkpoint={"every_epochs": 1, "every_minutes": 0.01, "keep": 1000})
    r = mpirun(2, pycode(SKEWED) + [json.dumps([[str(ref), []], [str(timed), ["watchdog_s=20"]]])], timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    steps = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "timed" / "checkpoints").glob("ckpt-*.pt"))
    assert steps[-1] == 56 and len(steps) >= 3, steps  # 56 steps: time-based ones before the epoch's
    a, b = final_weights(tmp_path / "ref" / "checkpoints"), final_weights(tmp_path / "timed" / "checkpoints")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ the line, without MPI
def mark(phase, detail, age, limit, waiting=False, stack=None):
    return {"phase": phase, "detail": detail, "age": age, "limit": limit, "waiting": waiting, "stack": stack}


def test_the_line_names_stuck_silent_and_waiting_ranks():
    hosts = ["node1", "node1", "node2", "node2"]
    line, stacks = watchdog.report(
        0, mark("sync", "the gradient allreduce of step 9", 12, 10, waiting=True),
        {1: mark("sync", "the gradient allreduce of step 9", 12, 10, waiting=True),
         2: mark("step", "forward/backward of step 9", 31, 10, stack="Thread 0x1 (main)\n  File x"),
         3: None}, hosts, "watchdog_s 10")
    assert line == ("watchdog: rank 2 on node2 made no progress for 31 s, in forward/backward of step 9; "
                    "rank 3 on node2 did not answer within 5 s (frozen, or cut off: a node lost?); "
                    "ranks 0-1 on node1 wait in the gradient allreduce of step 9 (watchdog_s 10); "
                    "ending the job (exit 4)")
    assert stacks == [(2, "Thread 0x1 (main)\n  File x")]


def test_the_line_for_collectives_that_never_match():
    line, stacks = watchdog.report(
        1, mark("sync", "a barrier", 11, 10, waiting=True),
        {0: mark("sync", "the metrics allreduce", 12, 10, waiting=True)}, ["a", "b"], "watchdog_s 10")
    assert line == ("watchdog: every rank waits in a collective that the others never join: rank 0 on a in the "
                    "metrics allreduce; rank 1 on b in a barrier (watchdog_s 10); ending the job (exit 4)")
    assert stacks == []


# ------------------------------------------------------------------ the decision, without MPI
class _World:
    rank, size, host = 1, 2, "a"


@pytest.mark.parametrize("waiting", [True, False], ids=["waiting", "not-waiting"])
@pytest.mark.parametrize("moves_on", [True, False], ids=["moves-on", "stays"])
def test_a_rank_that_moves_on_while_it_asks_does_not_fire(monkeypatch, waiting, moves_on):
    """The race seen at a run's end: rank 1 waits past its allowance and asks; meanwhile the wait
    ends and rank 0 finishes (its watchdog stopped: no answer). Silence then is no hang."""
    wd = watchdog.Watchdog(_World(), 2)
    wd.comm = object()
    wd.state = watchdog.Mark("sync" if waiting else "step", "x", watchdog._clock() - 10, 1.0, waiting, False)
    fired = []

    def ask():
        if moves_on:
            wd.state = watchdog.Mark("finishing", "the summary", watchdog._clock(), 10.0, False, False)
        return {0: None}

    monkeypatch.setattr(wd, "_ask", ask)
    monkeypatch.setattr(wd, "_fire", fired.append)
    wd._check()
    assert fired == ([] if moves_on else [{0: None}])
