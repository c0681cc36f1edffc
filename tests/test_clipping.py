"""Gradient clipping by global norm and weight clipping under data parallelism (real mpirun ranks).

The ranks' parameters must stay identical and equal one plain PyTorch process stepping on the
same global batches (both ranks' batches of each step, concatenated) with torch's own
clip_grad_norm_ and clamp — on every backend."""
from __future__ import annotations

import pytest

from conftest import mpirun, pycode, results
from test_train import BACKENDS, refused, write_job

AGAINST_ONE_PROCESS = """
import hashlib, json, sys
import torch
import mpidl
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.models import build_model
from mpidl.train.objectives import Classification
from mpidl.train.trainer import train

class Recording(Classification):
    # the batches this rank trained on, step by step
    def __init__(self):
        super().__init__()
        self.batches = []
    def __call__(self, model, x, y):
        if model.training:
            self.batches.append((x.clone(), y.clone()))
        return super().__call__(model, x, y)

class Capture(Callback):
    def on_start(self, t):
        self.start = {k: v.detach().clone() for k, v in t.net.state_dict().items()}
    def on_end(self, t, summary):
        self.end = {k: v.detach().clone() for k, v in t.net.state_dict().items()}

world = mpidl.init()


def against_one_process(spec):  # rank 0: what it saw; the others: None
    rec, cap = Recording(), Capture()
    train(spec, objective=rec, callbacks=[cap])
    batches = world.comm.gather(rec.batches, root=0)
    ends = world.comm.gather(cap.end, root=0)
    if world.rank == 0:
        o = spec.optimizer
        ref = build_model("mlp", in_features=8, num_classes=3, hidden=[32])
        ref.load_state_dict(cap.start)
        opt = torch.optim.SGD(ref.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        clipped_steps = 0
        for step in range(len(batches[0])):
            x = torch.cat([b[step][0] for b in batches])
            y = torch.cat([b[step][1] for b in batches])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), o.clip_grad_norm)
            clipped_steps += int(norm > o.clip_grad_norm)
            opt.step()
            with torch.no_grad():
                for p in ref.parameters():
                    w = o.clip_weights
                    if w.max_norm is None:
                        p.clamp_(w.min, w.max)
                    elif p.ndim >= 2:
                        rows = p.norm(dim=1, keepdim=True)
                        p.mul_(torch.where(rows > w.max_norm, w.max_norm / rows, torch.ones_like(rows)))
        hashes = {hashlib.sha256(b"".join(v.numpy().tobytes() for v in e.values())).hexdigest() for e in ends}
        worst = max((e[k] - v).abs().max().item() for e in ends for k, v in ref.state_dict().items())
        w = o.clip_weights
        if w.max_norm is None:
            at_bound = sum(int(((v == w.min) | (v == w.max)).sum()) for v in ends[0].values())
        else:
            at_bound = sum(int((v.norm(dim=1) > 0.999 * w.max_norm).sum()) for v in ends[0].values() if v.ndim >= 2)
        return {"STEPS": len(batches[0]), "CLIPPED": clipped_steps, "AT_BOUND": at_bound, "HASHES": len(hashes),
                "WORST": worst}


# each job in turn (a backend set up and closed a job): rank 0 prints what it saw of each
got = [against_one_process(load_spec(job)) for job in sys.argv[1:]]
if world.rank == 0:
    print("RESULT " + json.dumps(got), flush=True)
"""


# (backend, weight clipping) of each test below; the four jobs run in turn in one launch
CASES = {**{b: (b, {"min": -0.3, "max": 0.3}) for b in BACKENDS}, "max_norm": ("mpi", {"max_norm": 0.6})}


@pytest.fixture(scope="module")
def against_one_process(tmp_path_factory) -> dict:
    """Each case's figures: steps, steps clipped, weights at their bound, distinct final hashes
    across the ranks, and the worst difference from one process stepping on the global batches."""
    jobs = []
    for name, (backend, clip_weights) in CASES.items():
        jobs.append(str(write_job(tmp_path_factory.mktemp(name), backend=backend, epochs=1,
                                  schedule={"scale_lr": False},
                                  optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                                             "clip_grad_norm": 0.3, "clip_weights": clip_weights})))
    r = mpirun(2, pycode(AGAINST_ONE_PROCESS) + jobs, timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    (got,) = results(r)
    return dict(zip(CASES, got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipped_ranks_equal_one_process_on_the_global_batch(against_one_process, backend):
    got = against_one_process[backend]
    assert got["STEPS"] >= 50
    assert got["CLIPPED"] >= 10, got  # the gradient clipping acted
    assert got["AT_BOUND"] >= 10, got  # and so did the weight clipping
    assert got["HASHES"] == 1  # bit-identical on both ranks
    assert got["WORST"] < 2e-5, got  # and equal to the single process, up to summation order


def test_max_norm_weight_clipping_equals_one_process(against_one_process):
    got = against_one_process["max_norm"]
    assert got["CLIPPED"] >= 10 and got["AT_BOUND"] >= 5, got
    assert got["HASHES"] == 1 and got["WORST"] < 2e-5, got


@pytest.mark.parametrize("setting,expect", [
    (["--set", "optimizer.clip_weights={min: 0.5, max: -0.5}"], "min 0.5 > max -0.5"),
    (["--set", "optimizer.clip_weights={min: -0.5}"], "give both min and max"),
    (["--set", "optimizer.clip_grad_norm=0"], "optimizer.clip_grad_norm = 0: Input should be greater than 0"),
])
def test_bad_clipping_is_refused_with_one_line(tmp_path, setting, expect):
    """In-process, as `mpidl train` refuses it (the exit status under 2 ranks: test_train.py)."""
    assert expect in refused(write_job(tmp_path), *setting)
    assert not (tmp_path / "run").exists()  # nothing written
