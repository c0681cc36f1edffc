"""What a job spec adds to the training loop: its objective and its callbacks, picked in one place.

    classification / regression   the default objective, from the label dtype
    objective:, metrics:          yours (objectives.build_objective)
    distill:                      the Distillation objective and its summary (distill.py)
    optimizer.clip_grad_norm,
    optimizer.clip_weights        the Clipping callback (clipping.py)
    a linear model on a file that
    stores its linear rule        the CoefficientReport callback (regression.py)

A new workload adds a module and a line here, not a branch in the loop.
"""
from __future__ import annotations

import torch

from mpidl.data.synth import read_truth
from mpidl.spec import JobSpec
from mpidl.train.callbacks import Callback
from mpidl.train.objectives import Objective, build_objective


def workload_pieces(spec: JobSpec, world, inputs, device: torch.device) -> tuple[Objective, list[Callback]]:
    callbacks: list[Callback] = []
    opt = spec.optimizer
    if opt.clip_grad_norm is not None or opt.clip_weights is not None:
        from mpidl.train.clipping import Clipping

        callbacks.append(Clipping(opt.clip_grad_norm, opt.clip_weights))
    objective: Objective
    if spec.distill is not None:
        from mpidl.train.distill import distillation

        objective, report = distillation(spec, world, inputs, device)
        callbacks.append(report)
    else:
        objective = build_objective(spec, inputs.classify)
    if not inputs.classify and spec.model.name == "linear":
        truth = read_truth(inputs.train_source.files[0], inputs.train_source.keys[1])
        if truth is not None and truth["rule"] == "linear":
            from mpidl.train.regression import CoefficientReport

            callbacks.append(CoefficientReport(truth, len(inputs.train_source), inputs.train_transform.standardizer))
    return objective, callbacks
