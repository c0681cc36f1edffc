"""Preemption: a signal at one rank mid-epoch stops every rank after the same step with a
checkpoint; resuming continues bit for bit (real mpirun ranks, real signals).

Each test runs on 2 ranks through mpidl's pytest plugin (`@pytest.mark.mpirun`), all of them in
one launch: the runs a test compares (uninterrupted, signalled, resumed) are `train()` calls in
the same ranks, one after the other, as a requeued job would run them in a new process. Files
are written by rank 0 alone. The SLURM side (the warning signal, requeue) is tested on the
local cluster in test_slurm_*.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from mpidl import preemption
from mpidl.spec import load_spec
from mpidl.train import checkpoint, trainer
from mpidl.train.callbacks import Callback
from test_checkpoint import image_job
from test_train import BACKENDS, final_weights, write_job


class SignalRankOne(Callback):
    """During step number `at` (0-based), on rank 1 alone, the signal `name`."""

    def __init__(self, name: str, at: int):
        self.name, self.at = name, at

    def after_step(self, trainer):
        if trainer.world.rank == 1 and trainer.position.global_step == self.at:
            os.kill(os.getpid(), getattr(signal, self.name))


def train(job, name: str = "SIGUSR2", at: int = -1) -> dict:
    """One job, as a fresh process (a requeued job) runs it: no signal recorded yet."""
    preemption.reset()
    s = trainer.train(load_spec(job), resume="auto", callbacks=[SignalRankOne(name, at)])
    return {k: s[k] for k in ("preempted", "global_step", "resumed_from")}


def by_rank0(world, fn):
    """fn() on rank 0 (which writes the files), its result on every rank."""
    return world.comm.bcast(fn() if world.rank == 0 else None, root=0)


def assert_same_weights(a_dir, b_dir) -> None:
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.mpirun(2, timeout=300)
@pytest.mark.parametrize("backend,signame", [(b, "SIGUSR2") for b in BACKENDS] + [("mpi", "SIGTERM")])
def test_signal_mid_epoch_checkpoints_and_resumes_exactly(world, shared_tmp_path, backend, signame):
    over = dict(backend=backend, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4})
    full, part = by_rank0(world, lambda: (image_job(shared_tmp_path, "full", **over),
                                          image_job(shared_tmp_path, "part", **over)))
    assert train(full, signame) == {"preempted": None, "global_step": 90, "resumed_from": None}

    # rank 1 got the signal during step 51; the ranks learn of it at the next step boundary
    # (the flags' allreduce is read one step late), so both stop after step 52, mid-epoch 2
    assert train(part, signame, 50) == {"preempted": signame, "global_step": 52, "resumed_from": None}
    ckpts = sorted(p.name for p in (shared_tmp_path / "part" / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts[-1] == "ckpt-000000052.pt"

    s = train(part, signame)  # the requeued job
    assert s["preempted"] is None and s["global_step"] == 90 and s["resumed_from"].endswith("ckpt-000000052.pt")
    assert_same_weights(shared_tmp_path / "full" / "checkpoints", shared_tmp_path / "part" / "checkpoints")


@pytest.mark.mpirun(2, timeout=300)
def test_auto_resume_starts_fresh_without_a_checkpoint(world, shared_tmp_path):
    job = by_rank0(world, lambda: write_job(shared_tmp_path, epochs=1))  # 1800 rows / (2 ranks × 16) = 56 steps
    assert train(job) == {"preempted": None, "global_step": 56, "resumed_from": None}


@pytest.mark.mpirun(2, timeout=300)
def test_a_signal_outside_the_training_loop(world, shared_tmp_path, monkeypatch):
    """SIGUSR2 during set-up stops the job before its first step with a checkpoint, and the job
    resumed from it ends where an uninterrupted one does; during the final save it is kept until
    the save is done (the job has finished). Before, both ended the rank with status 140."""
    # As `mpidl train` does, first thing; undone at the end, for the tests after this one.
    handlers = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    monkeypatch.setattr(preemption, "_armed", preemption.armed())
    preemption.arm()
    try:
        def signalled(fn, rank, when=lambda *a: True):
            def wrapped(*args, **kwargs):
                if world.rank == rank and when(*args):
                    os.kill(os.getpid(), signal.SIGUSR2)
                return fn(*args, **kwargs)
            return wrapped

        def jobs():
            (shared_tmp_path / "full").mkdir(), (shared_tmp_path / "part").mkdir()
            return write_job(shared_tmp_path / "full", epochs=1), write_job(shared_tmp_path / "part", epochs=1)

        full, part = by_rank0(world, jobs)
        assert train(full)["preempted"] is None

        with monkeypatch.context() as m:  # during the label scan and standardisation pass, on rank 1 alone
            m.setattr(trainer, "build_inputs", signalled(trainer.build_inputs, 1))
            assert train(part) == {"preempted": "SIGUSR2", "global_step": 0, "resumed_from": None}
        assert (shared_tmp_path / "part" / "run" / "checkpoints" / "ckpt-000000000.pt").exists()

        with monkeypatch.context() as m:  # while rank 0 writes the last checkpoint
            m.setattr(checkpoint, "save", signalled(checkpoint.save, 0, lambda folder, step, *a: step == 56))
            s = train(part)
        assert s["preempted"] is None and s["global_step"] == 56 and s["resumed_from"].endswith("ckpt-000000000.pt")
        assert_same_weights(shared_tmp_path / "full" / "run" / "checkpoints",
                            shared_tmp_path / "part" / "run" / "checkpoints")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
