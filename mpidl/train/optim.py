"""The optimizer and the learning-rate schedule a job spec asks for."""
from __future__ import annotations

import math

import torch
from torch import nn

from mpidl.spec import JobSpec


def build_optimizer(spec: JobSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=lr, betas=o.betas, weight_decay=o.weight_decay)


def lr_scale(spec: JobSpec, world_size: int) -> int:
    """Linear scaling of the base lr with the world size (Goyal et al.), when asked for."""
    return world_size if spec.schedule.scale_lr else 1


def lr_factor(spec: JobSpec, world_size: int, steps_per_epoch: int, total_steps: int):
    """The schedule as a multiplier of the (scaled) base lr, per optimizer step."""
    s = spec.schedule
    scale = lr_scale(spec, world_size)
    warm = int(s.warmup_epochs * steps_per_epoch)
    floor = s.min_lr / (spec.optimizer.lr * scale)

    def f(step: int) -> float:
        if warm and step < warm:  # from the unscaled lr up to the scaled one (Goyal et al.)
            return (1 + (scale - 1) * step / warm) / scale
        if s.kind == "cosine":
            t = (step - warm) / max(1, total_steps - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if s.kind == "step":
            return s.gamma ** int(step / (s.step_epochs * steps_per_epoch))
        return 1.0
    return f


def build_scheduler(spec: JobSpec, optimizer: torch.optim.Optimizer, world_size: int, steps_per_epoch: int,
                    total_steps: int, global_step: int, state: dict | None = None):
    """LambdaLR over the whole job, positioned at `global_step` (a resumed job continues there)."""
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec, world_size, steps_per_epoch,
                                                                       total_steps))
    if state is not None:
        scheduler.load_state_dict(state)
    scheduler.last_epoch = global_step
    # LambdaLR's constructor set the step-0 rate; a resumed job continues at its own step.
    for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
        g["lr"] = base * scheduler.lr_lambdas[0](global_step)
    return scheduler
