"""Preemption: a signal at one rank mid-epoch stops every rank after the same step with a
checkpoint; resuming continues bit for bit (real mpirun, real signals).

The SLURM side (the warning signal, requeue) is tested on the local cluster in test_slurm_*.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import mpirun, pycode
from test_checkpoint import image_job
from test_train import BACKENDS, final_weights, write_job

SIGNAL_ONE_RANK = """
import json, os, signal, sys, mpidl
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

w = mpidl.init()
job, name, at = sys.argv[1], sys.argv[2], int(sys.argv[3])

class SignalRankOne(Callback):
    def after_step(self, trainer):   # during step number `at` (0-based), on rank 1 alone
        if w.rank == 1 and trainer.position.global_step == at:
            os.kill(os.getpid(), getattr(signal, name))

s = train(load_spec(job), resume="auto", callbacks=[SignalRankOne()])
if w.rank == 0:
    print("SUMMARY " + json.dumps({k: s[k] for k in ("preempted", "global_step", "resumed_from")}), flush=True)
"""


def _summary(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("SUMMARY "))[8:])


@pytest.mark.parametrize("backend,signame", [(b, "SIGUSR2") for b in BACKENDS] + [("mpi", "SIGTERM")])
def test_signal_mid_epoch_checkpoints_and_resumes_exactly(tmp_path, backend, signame):
    over = dict(backend=backend, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4})
    full = image_job(tmp_path, "full", **over)
    r = mpirun(2, pycode(SIGNAL_ONE_RANK) + [str(full), signame, "-1"], timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    assert _summary(r.stdout) == {"preempted": None, "global_step": 90, "resumed_from": None}

    part = image_job(tmp_path, "part", **over)
    r = mpirun(2, pycode(SIGNAL_ONE_RANK) + [str(part), signame, "50"], timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    # rank 1 got the signal during step 51; the ranks learn of it at the next step boundary
    # (the flags' allreduce is read one step late), so both stop after step 52, mid-epoch 2
    assert _summary(r.stdout) == {"preempted": signame, "global_step": 52, "resumed_from": None}
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts[-1] == "ckpt-000000052.pt"

    r = mpirun(2, pycode(SIGNAL_ONE_RANK) + [str(part), signame, "-1"], timeout=300)  # the requeued job
    assert r.returncode == 0, r.output[-3000:]
    s = _summary(r.stdout)
    assert s["preempted"] is None and s["global_step"] == 90 and s["resumed_from"].endswith("ckpt-000000052.pt")
    a, b = final_weights(tmp_path / "full" / "checkpoints"), final_weights(tmp_path / "part" / "checkpoints")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_auto_resume_starts_fresh_without_a_checkpoint(tmp_path):
    job = write_job(tmp_path, epochs=1)  # 1800 training rows / (2 ranks × 16) = 56 steps
    r = mpirun(2, pycode(SIGNAL_ONE_RANK) + [str(job), "SIGUSR2", "-1"], timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    assert _summary(r.stdout) == {"preempted": None, "global_step": 56, "resumed_from": None}


SIGNAL_OUTSIDE_TRAINING = """
import json, os, signal, sys, mpidl
from mpidl import preemption
from mpidl.spec import load_spec
from mpidl.train import checkpoint, trainer

preemption.arm()  # as `mpidl train` does, first thing
w = mpidl.init()
job, phase = sys.argv[1], sys.argv[2]

def signalled(fn, rank, when=lambda *a: True):
    def wrapped(*args, **kwargs):
        if w.rank == rank and when(*args):
            os.kill(os.getpid(), signal.SIGUSR2)
        return fn(*args, **kwargs)
    return wrapped

if phase == "setup":   # during the label scan and standardisation pass, on rank 1 alone
    trainer.build_inputs = signalled(trainer.build_inputs, 1)
elif phase == "final-save":   # while rank 0 writes the last checkpoint
    checkpoint.save = signalled(checkpoint.save, 0, lambda folder, step, *a: step == 56)
s = trainer.train(load_spec(job), resume="auto")
if w.rank == 0:
    print("SUMMARY " + json.dumps({k: s[k] for k in ("preempted", "global_step", "resumed_from")}), flush=True)
"""


def test_a_signal_outside_the_training_loop(tmp_path):
    """SIGUSR2 during set-up stops the job before its first step with a checkpoint, and the job
    resumed from it ends where an uninterrupted one does; during the final save it is kept until
    the save is done (the job has finished). Before, both ended the rank with status 140."""
    (tmp_path / "full").mkdir(), (tmp_path / "part").mkdir()
    full = write_job(tmp_path / "full", epochs=1)
    r = mpirun(2, pycode(SIGNAL_OUTSIDE_TRAINING) + [str(full), "none"], timeout=300)
    assert r.returncode == 0, r.output[-3000:]

    part = write_job(tmp_path / "part", epochs=1)
    r = mpirun(2, pycode(SIGNAL_OUTSIDE_TRAINING) + [str(part), "setup"], timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    assert _summary(r.stdout) == {"preempted": "SIGUSR2", "global_step": 0, "resumed_from": None}
    assert (tmp_path / "part" / "run" / "checkpoints" / "ckpt-000000000.pt").exists()
    r = mpirun(2, pycode(SIGNAL_OUTSIDE_TRAINING) + [str(part), "final-save"], timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    s = _summary(r.stdout)
    assert s["preempted"] is None and s["global_step"] == 56 and s["resumed_from"].endswith("ckpt-000000000.pt")
    a, b = final_weights(tmp_path / "full" / "run" / "checkpoints"), final_weights(tmp_path / "part" / "run" / "checkpoints")
    for k in a:
        assert torch.equal(a[k], b[k]), k
