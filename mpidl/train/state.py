"""The training state a checkpoint holds, and where a resumed run continues.

A checkpoint (one file, written atomically by rank 0, see `checkpoint`) holds: the model with
BatchNorm statistics averaged over ranks, each rank's own statistics (`rank_buffers`, so that
saving changes nothing and a resume on as many ranks continues exactly), the optimizer and
scheduler state, the position (epoch, step in epoch, global step), the world size, the RNG
states, the job's spec (None for a run of one's own loop) and the fingerprint a resume must match.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from mpidl import log, watchdog
from mpidl.errors import BadInput
from mpidl.train import checkpoint, rng


@dataclass
class Position:
    """Where training stands: `global_step` optimizer steps done, `step_in_epoch` of them in `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b for k, b in model.named_buffers() if b.is_floating_point() and b.numel()}


def averaged_buffers(world, model: nn.Module) -> dict[str, torch.Tensor]:
    """Float buffers (BatchNorm statistics, kept per rank while training) averaged over ranks."""
    out = {}
    for k, b in float_buffers(model).items():
        arr = b.detach().to("cpu", torch.float64).numpy().copy()
        if world.size > 1:
            from mpi4py import MPI

            world.comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        out[k] = torch.from_numpy(arr / world.size).to(b.dtype)
    return out


def sync_buffers(world, model: nn.Module) -> None:
    """Make every rank's buffers the average: evaluation sees one model."""
    if world.size > 1:
        with watchdog.waiting("averaging BatchNorm statistics"):
            for k, avg in averaged_buffers(world, model).items():
                float_buffers(model)[k].copy_(avg)


def read_latest(folder: Path, fingerprint: Optional[str], world, resume: Union[bool, str]) -> Optional[dict]:
    """Rank 0's newest checkpoint of this job, on every rank; None for a fresh start.

    resume=True requires one; resume="auto" (a requeued job) takes one if there is one.
    """
    def read() -> Optional[dict]:
        if world.rank != 0:
            return None
        found = checkpoint.load_newest(folder, fingerprint)
        if found is None:
            if resume == "auto":
                return None
            raise BadInput(f"{folder}: --resume given but no checkpoint (ckpt-*.pt) is there")
        return {"path": str(found[0]), **found[1]}

    state = world.agree(read)
    if world.size > 1:
        with watchdog.waiting("rank 0's checkpoint, read to resume"):
            state = world.comm.bcast(state, root=0)
    return state


def fresh_run_dir(run_dir: Path, folder: Path, world, overwrite: bool) -> None:
    """A fresh start must not mix with the run already in its folder (its checkpoints would be
    resumed from, its metrics appended to): refuse, or with `overwrite` clear them (rank 0)."""
    if world.rank != 0:
        return
    found = checkpoint.all_checkpoints(folder)
    if not found:
        return
    if not overwrite:
        raise BadInput(f"{folder}: already holds a run's checkpoints ({found[-1].name}): "
                       "add --resume to continue it, --overwrite to replace it, or set another output or name")
    for p in found:
        p.unlink()
    for name in ("metrics.jsonl", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)
    log.get().warning("--overwrite: removed %d checkpoint(s) of the previous run in %s", len(found), run_dir)


def restore_rng(state: dict) -> None:
    """For code that draws from the global generators; the loop itself reseeds torch each step."""
    rng.restore(state["rng"])


def resume_position(state: dict, per_step: int, world, steps_per_epoch: int) -> Position:
    """Where a run resumed from `state` continues; on another world size, re-sharded.
    per_step: the samples one rank takes per optimizer step."""
    pos = Position(epoch=state["epoch"])
    if state["world_size"] == world.size:
        pos.step_in_epoch, pos.global_step = state["step_in_epoch"], state["global_step"]
    else:  # re-shard: keep the samples consumed in this epoch, in steps of the new size
        seen = state["step_in_epoch"] * state["world_size"] * per_step
        pos.step_in_epoch = min(seen // (world.size * per_step), steps_per_epoch)
        pos.global_step = pos.epoch * steps_per_epoch + pos.step_in_epoch
        if world.rank == 0:  # the same on every rank: said once
            log.get().warning("resuming a %d-rank checkpoint on %d ranks: epoch %d continues at step %d of %d",
                              state["world_size"], world.size, pos.epoch, pos.step_in_epoch, steps_per_epoch)
    if pos.step_in_epoch >= steps_per_epoch:
        pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
    return pos


def snapshot(world, net: nn.Module, optimizer, scheduler, pos: Position, fingerprint: str,
             spec: Optional[dict], extra: Optional[dict] = None) -> Optional[dict]:
    """The checkpoint contents (on rank 0; None elsewhere). A collective: call on every rank.

    The saved model has the averaged buffers; each rank's own are kept beside it so a resume
    on as many ranks continues exactly (saving must not change the training).
    """
    with watchdog.waiting("gathering the checkpoint's BatchNorm statistics"):
        avg = averaged_buffers(world, net)
        mine = {k: b.detach().cpu().clone() for k, b in float_buffers(net).items()}
        per_rank = world.comm.gather(mine, root=0) if world.size > 1 else [mine]
    if world.rank != 0:
        return None
    weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    weights.update(avg)
    return {"model": weights, "rank_buffers": per_rank, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None, "epoch": pos.epoch,
            "step_in_epoch": pos.step_in_epoch, "global_step": pos.global_step, "world_size": world.size,
            "fingerprint": fingerprint, "rng": rng.capture(), "spec": spec, **(extra or {})}
