"""A user's own package, written into a temporary folder outside the repository: a model, a
loss, a metric, a transform, a job spec naming them, and a training loop of their own (the
example's). Nothing of it lies under mpidl/; the tests import it only by name, as a user's
compute node does."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import yaml

from conftest import ROOT

FILES = {
    "mynets/__init__.py": "",
    "mynets/models.py": '''
        import torch
        from torch import nn


        class TinyNet(nn.Module):
            """Takes its input size and class count as mpidl fills them in."""

            def __init__(self, in_features, num_classes, hidden=32):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

            def forward(self, x):
                return self.body(x.flatten(1))


        def make_net(width=16):
            """A factory: for 8 features and 3 classes, whatever the spec says."""
            return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 3))


        def not_a_module(**kwargs):
            return "a string"


        def signalling_net(in_features, num_classes, hidden=32, signal_in_setup=False, signal_at_state_dict=0):
            """TinyNet that sends rank 0 SLURM's warning signal while the job sets up, or during its n-th
            state_dict() (the broadcast at set-up, then one per checkpoint): a signal outside the training
            loop, on the job's first run only (not once it is requeued)."""
            import os
            import signal

            first_run = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
            rank0 = os.environ.get("SLURM_PROCID", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0"
            if signal_in_setup and rank0 and first_run:
                os.kill(os.getpid(), signal.SIGUSR2)
            net = TinyNet(in_features, num_classes, hidden)
            calls = [0]

            def hook(module, prefix, keep_vars):
                calls[0] += 1
                if rank0 and first_run and calls[0] == signal_at_state_dict:
                    os.kill(os.getpid(), signal.SIGUSR2)

            if signal_at_state_dict:
                net.register_state_dict_pre_hook(hook)
            return net
    ''',
    "mynets/losses.py": '''
        import torch
        from torch import nn


        def focal(output, target, gamma=2.0):
            logp = torch.log_softmax(output.float(), dim=1).gather(1, target[:, None]).squeeze(1)
            return (-(1 - logp.exp()) ** gamma * logp).mean()


        class Smoothed(nn.Module):
            def __init__(self, smoothing=0.1):
                super().__init__()
                self.loss = nn.CrossEntropyLoss(label_smoothing=smoothing)

            def forward(self, output, target):
                return self.loss(output.float(), target)
    ''',
    "mynets/metrics.py": '''
        def top2_correct(output, target):
            return (output.topk(2, dim=1).indices == target[:, None]).any(1).sum()
    ''',
    "mynets/aug.py": '''
        import torch


        def jitter(x, y, scale=0.01):
            return x + scale * torch.randn_like(x), y
    ''',
    "mynets/broken.py": '''
        import torch

        raise RuntimeError("this module cannot be imported")
    ''',
}


def job(folder: Path, **over) -> dict:
    """The user's job spec: their model, loss, metric and transform, on synthetic tabular data."""
    spec = {
        "name": "user", "seed": 4, "epochs": 2, "backend": "mpi",
        "data": {"files": "tab.h5", "batch": 16, "val_fraction": 0.1,
                 "synth": {"kind": "tabular", "rows": 2000, "features": 8, "classes": 3, "rule": "nonlinear"}},
        "model": {"name": "mynets.models:TinyNet", "args": {"hidden": 32}},
        "objective": {"name": "mynets.losses:focal", "args": {"gamma": 1.5}},
        "metrics": {"top2": "mynets.metrics:top2_correct"},
        "transform": {"name": "mynets.aug:jitter", "args": {"scale": 0.01}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "checkpoint": {"every_epochs": 1},
        "output": "runs/{name}", "log_every": 5,
    }
    for key, value in over.items():
        node = spec
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return spec


def make(folder: Path, **over) -> Path:
    """The user's folder: the package, the example loop and model, and job.yaml; returns the job file."""
    for name, text in FILES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    for name in ("net.py", "mpidl_loop.py", "plain_loop.py"):
        shutil.copy(ROOT / "examples" / name, folder / name)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job(folder, **over), sort_keys=False))
    return path
