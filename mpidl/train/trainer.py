"""The training loop: one JobSpec, any launcher, any backend.

    trainer = Trainer(spec, resume=False, objective=None, callbacks=())   # set up (collective)
    summary = trainer.fit(stop_at=None)                                   # run; rank 0 writes the record

or `train(spec, ...)`, which does both and releases the backend. The pieces are separate
modules: `inputs` (data, loaders), `models`, `optim` (optimizer, schedule), `objectives` (the
loss of a step), `evaluate`, `state` (what a checkpoint holds, where a resume continues),
`record` (metrics, progress, summary), `preemption` (signals), `callbacks` (what a workload
adds to the loop).

Per optimizer step the time splits into four buckets (seconds, averaged over ranks):

  data      waiting for the next batch from the prefetching loader, plus its transform (uint8
            scaling, crop, flip) and, on CUDA, its copy to the device
  compute   forward + backward. ddp: includes its bucketed allreduces, which run inside
            backward (the part not hidden behind the gradient computation lands here).
            horovod: backward hooks only enqueue allreduces for Horovod's background thread.
            mpi: nothing is sent yet.
  sync      backend.sync_gradients, until this step's gradients are averaged. horovod:
            optimizer.synchronize(), waiting for the allreduces still in flight when backward
            ended; mpi: all the communication (flatten, Allreduce per bucket, unflatten);
            ddp: nothing left to do, so 0.
  optimizer the parameter update, zeroing gradients and the learning-rate schedule (and the
            after_sync / after_step callbacks)

With `timing: sync` on CUDA, the device is synchronised at each boundary so the buckets are
real (costs a little throughput); with `timing: off` they are host time only (kernels still
queued show up in a later bucket). On CPU the work is synchronous anyway.

Determinism: the loader's order depends on (seed, epoch) only, and the torch RNG (dropout,
crop, flip) is reseeded at every step from (seed, step, rank). So a run resumed from a
checkpoint continues bit for bit on CPU, and at another world size it re-shards sensibly.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from typing import Iterator, Optional, Sequence, Union

import torch

import mpidl
from mpidl import log
from mpidl.spec import JobSpec
from mpidl.train import checkpoint
from mpidl.train.backends import make_backend
from mpidl.train.callbacks import Callback
from mpidl.train.evaluate import evaluate
from mpidl.train.finite import FiniteLoss
from mpidl.train.inputs import build_inputs, steps_per_epoch, with_classes
from mpidl.train.models import model_for
from mpidl.train.objectives import Objective
from mpidl.train.optim import build_optimizer, build_scheduler, lr_scale
from mpidl.train.preemption import Preemption
from mpidl.train.record import Recorder, versions
from mpidl.train.state import (Position, float_buffers, fresh_run_dir, read_latest, restore_rng,
                               resume_position, snapshot)
from mpidl.train.workloads import workload_pieces

BUCKETS = ("data", "compute", "sync", "optimizer")


_U64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash (a few hundred ns in Python)."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's random draws at one step: a pure function of (seed, step, rank)."""
    return _mix(_mix(_mix(seed & _U64) ^ step) ^ rank)


def _shown(metrics: dict) -> str:
    return " ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items())


class Trainer:
    """One job on this rank. The constructor sets everything up (a collective); `fit` runs it."""

    def __init__(self, spec: JobSpec, resume: Union[bool, str] = False, objective: Optional[Objective] = None,
                 callbacks: Sequence[Callback] = (), overwrite: bool = False, world=None):
        self.spec = spec
        self.world = world = world or mpidl.init()  # a World over part of the job (a sweep's task) or all of it
        self.log = log.get()
        self.device = torch.device(world.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(spec.seed)

        self.inputs = build_inputs(spec, world)
        # The class count the labels gave, where the spec gives none: the model, a distillation
        # student and the checkpoint's copy of the spec all take it from here.
        self.spec = spec = with_classes(spec, self.inputs.classes)
        self.steps_per_epoch = steps_per_epoch(spec, world, self.inputs)
        self.total_steps = spec.steps or spec.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        spec_objective, spec_callbacks = workload_pieces(spec, world, self.inputs, self.device)  # loss, clipping...
        self.objective = objective or spec_objective
        self.callbacks = [*spec_callbacks, *callbacks]

        self.backend = backend = world.agree(lambda: make_backend(spec.backend, world, {
            **spec.model_dump().get(spec.backend, {}), "backward_passes_per_step": spec.accumulate}))
        model = world.agree(lambda: model_for(spec, self.inputs.train_source)).to(self.device)
        self.channels_last = spec.model.channels_last
        if self.channels_last and backend.channels_last_weights:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(spec, model, spec.optimizer.lr * lr_scale(spec, world.size))

        # Resume: rank 0 reads the newest checkpoint, every rank gets it.
        if not resume:
            world.agree(lambda: fresh_run_dir(spec, world, overwrite))
        state = read_latest(spec, world, resume) if resume else None
        self.position = Position()
        self.resumed_from = None
        if state is not None:
            model.load_state_dict(state["model"])
            restore_rng(state)
            self.position = resume_position(state, spec, world, self.steps_per_epoch)
            self.resumed_from = state["path"]
            p = self.position
            self.log.info("resumed from %s at epoch %d, step %d (global %d)", self.resumed_from, p.epoch,
                          p.step_in_epoch, p.global_step)
        same_world = state is not None and state["world_size"] == world.size

        self.model, self.optimizer = backend.prepare(model, optimizer)  # rank 0's weights and buffers everywhere
        if state is not None:
            # Into the optimizer the backend returned: Horovod's wrapper is a new optimizer that
            # starts with empty state. Every rank holds rank 0's checkpoint: nothing to broadcast.
            self.optimizer.load_state_dict(state["optimizer"])
            if not same_world:
                for g in self.optimizer.param_groups:  # the scaled lr follows the new world size
                    g["initial_lr"] = spec.optimizer.lr * lr_scale(spec, world.size)
        self.net = backend.unwrap(self.model)  # the plain module: its state_dict is what checkpoints hold
        if same_world:  # each rank takes back its own BatchNorm statistics
            for k, b in float_buffers(self.net).items():
                b.copy_(state["rank_buffers"][world.rank][k])
        if spec.model.compile:
            self.model = torch.compile(self.model)
        self.scheduler = build_scheduler(spec, self.optimizer, world.size, self.steps_per_epoch, self.total_steps,
                                         self.position.global_step, state["scheduler"] if same_world else None)
        state = None

        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if spec.precision == "bf16"
                         else contextlib.nullcontext())
        self.recorder = Recorder(world, spec.run_dir, append=self.resumed_from is not None)
        self._sync_device = (torch.cuda.synchronize if self.device.type == "cuda" and spec.timing == "sync"
                             else (lambda: None))
        self.preempted: Optional[str] = None
        self.totals = {**{k: 0.0 for k in BUCKETS}, "steps": 0, "samples": 0}
        self.finite = FiniteLoss(world.rank, lagged=self.device.type == "cuda")
        self.lagged_metrics = self.device.type == "cuda"
        self.last_eval: dict = {}
        self.log.info("%s: %s on %d rank(s) (%s), backend %s, %d steps/epoch × %d epochs, batch %d/rank",
                      spec.name, spec.model.name, world.size, world.launcher, backend.name, self.steps_per_epoch,
                      self.epochs, spec.data.batch)

    # ------------------------------------------------------------------ pieces
    def _new_window(self) -> dict:
        return {"loss": 0.0, "count": 0.0, "time": 0.0, "steps": 0,
                **{k: 0.0 for k in self.objective.counts_keys()}, **{k: 0.0 for k in BUCKETS}}

    def train_step(self, batches: Iterator, window: dict) -> dict[str, float]:
        """One optimizer step (accumulating `spec.accumulate` batches); its time per bucket."""
        spec, world, backend, model, optimizer = self.spec, self.world, self.backend, self.model, self.optimizer
        step = self.position.global_step
        # The generators of this device only: torch.manual_seed would also queue a seed for
        # every lazy accelerator module, formatting a stack trace each time (~0.3 ms a step).
        seed = _step_seed(spec.seed, step, world.rank)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        self.inputs.train_transform.generator.manual_seed(_step_seed(spec.seed + 1, step, world.rank))
        t0 = time.perf_counter()
        t_data = t_compute = 0.0
        for micro in range(spec.accumulate):
            ta = time.perf_counter()
            x, y = next(batches)
            if self.channels_last and x.ndim == 4:
                x = x.to(memory_format=torch.channels_last)
            self._sync_device()
            tb = time.perf_counter()
            last = micro == spec.accumulate - 1
            with (contextlib.nullcontext() if last else backend.no_sync(model, optimizer)):
                with self.autocast:
                    loss, out = self.objective(model, x, y)
                batch_loss = self.finite.watch(step, loss, x, y)
                (loss / spec.accumulate if spec.accumulate > 1 else loss).backward()
            self._sync_device()
            t_data += tb - ta
            t_compute += time.perf_counter() - tb
            # On a GPU the sums stay on the device until log time (no host sync per step); on
            # the CPU a host read costs less than a tensor addition.
            window["loss"] += batch_loss * x.shape[0]
            for k, v in self.objective.counts(out, y).items():
                window[k] += v if self.lagged_metrics else v.item()
            window["count"] += x.shape[0]
        t1 = time.perf_counter()
        backend.sync_gradients(model, optimizer)
        self._sync_device()
        t2 = time.perf_counter()
        for cb in self.callbacks:
            cb.after_sync(self)
        backend.step(optimizer)
        for cb in self.callbacks:
            cb.after_step(self)
        backend.zero_grad(optimizer)
        self.scheduler.step()
        self._sync_device()
        t3 = time.perf_counter()
        times = {"data": t_data, "compute": t_compute, "sync": t2 - t1, "optimizer": t3 - t2}
        for k, v in times.items():
            window[k] += v
        window["time"] += t3 - t0
        window["steps"] += 1
        return times

    def log_window(self, window: dict) -> None:
        """The training record of the steps since the last one (a collective)."""
        spec, pos = self.spec, self.position
        keys = ["loss", "count", "time", *self.objective.counts_keys(), *BUCKETS]
        avg = self.backend.average({k: window[k] for k in keys})
        n = window["steps"]
        rec = {"step": pos.global_step, "epoch": pos.epoch + pos.step_in_epoch / self.steps_per_epoch,
               "loss": avg["loss"] / avg["count"], "lr": self.optimizer.param_groups[0]["lr"],
               "step_time": avg["time"] / n,
               "samples_per_s": n * spec.data.batch * spec.accumulate * self.world.size / avg["time"]}
        for name, key in self.objective.ratios.items():
            rec[name] = avg[key] / avg["count"]
        rec["time"] = {k: avg[k] / n for k in BUCKETS}
        for cb in self.callbacks:
            cb.on_record(self, rec)
        self.recorder.write(rec)
        shown = " ".join(f"{name} {rec[name]:.3f}" for name in self.objective.ratios)
        self.recorder.show(f"epoch {pos.epoch + 1}/{self.epochs} step {pos.step_in_epoch}/{self.steps_per_epoch} "
                           f"loss {rec['loss']:.4f}" + (f" {shown}" if shown else "")
                           + f" {rec['samples_per_s']:.0f} samples/s")

    def evaluate(self) -> dict:
        """Held-out metrics of the current model (a collective)."""
        return evaluate(self.world, self.backend, self.model, self.net, self.inputs.val_loader, self.objective,
                        self.autocast, self.channels_last)

    def evaluate_and_log(self) -> dict:
        res = self.evaluate()
        if res:
            pos = self.position
            rec = {"step": pos.global_step, "epoch": pos.epoch + pos.step_in_epoch / self.steps_per_epoch, **res}
            for cb in self.callbacks:
                cb.on_record(self, rec)
            self.recorder.write(rec)
            self.recorder.show(f"epoch {rec['epoch']:.2f}/{self.epochs} " + _shown(res), final=True)
        self.last_eval = res
        return res

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint of the current step atomically (a collective)."""
        self.finite.check()  # never save weights that a non-finite loss has reached
        state = snapshot(self.world, self.spec, self.net, self.optimizer, self.scheduler, self.position)
        if state is not None:
            path = checkpoint.save(self.spec.checkpoint_dir, self.position.global_step, state, self.spec.checkpoint.keep)
            self.log.info("checkpoint %s", path)
        self.world.barrier()

    def _has_final_checkpoint(self) -> bool:
        have = checkpoint.path_for(self.spec.checkpoint_dir, self.position.global_step).exists() \
            if self.world.rank == 0 else None
        return self.world.comm.bcast(have, root=0) if self.world.size > 1 else have

    # ------------------------------------------------------------------ the loop
    def steps(self, stop_at: Optional[int] = None) -> Iterator[Position]:
        """Train, yielding the position after every optimizer step and its bookkeeping (the log
        record, checkpoints, the evaluation at an epoch's end). `fit` runs it to the end; a
        benchmark can drive it one step at a time."""
        spec, pos, ck = self.spec, self.position, self.spec.checkpoint
        spe = self.steps_per_epoch
        totals = self.totals
        window = self._new_window()
        end = min(self.total_steps, stop_at) if stop_at is not None else self.total_steps
        for cb in self.callbacks:
            cb.on_start(self)
        self.model.train()
        with Preemption(self.world) as preemption:
            while pos.epoch < self.epochs and pos.global_step < end and not self.preempted:
                self.inputs.loader.set_epoch(pos.epoch, start_step=pos.step_in_epoch * spec.accumulate)
                batches = iter(self.inputs.loader)
                while pos.step_in_epoch < spe and pos.global_step < end and not self.preempted:
                    times = self.train_step(batches, window)
                    for k in BUCKETS:
                        totals[k] += times[k]
                    totals["steps"] += 1
                    totals["samples"] += spec.data.batch * spec.accumulate * self.world.size
                    pos.step_in_epoch += 1
                    pos.global_step += 1
                    self.preempted = preemption.requested()
                    if (pos.global_step % spec.log_every == 0 or pos.step_in_epoch == spe
                            or pos.global_step == end or self.preempted):
                        self.log_window(window)
                        window = self._new_window()
                    if ck.every_steps and pos.global_step % ck.every_steps == 0:
                        self.save_checkpoint()
                    if pos.step_in_epoch < spe:
                        yield pos
                batches.close()
                if pos.step_in_epoch == spe:
                    self.evaluate_and_log()
                    pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                    if ck.every_epochs and pos.epoch % ck.every_epochs == 0:
                        if not (ck.every_steps and pos.global_step % ck.every_steps == 0):
                            self.save_checkpoint()
                    yield pos
        if self.preempted:
            self.log.warning("%s received: stopping after step %d with a checkpoint", self.preempted, pos.global_step)
        elif pos.global_step == self.total_steps and pos.step_in_epoch:  # a job of `steps` that ends mid-epoch
            self.evaluate_and_log()

    def fit(self, stop_at: Optional[int] = None) -> dict:
        """Train to the end of the job (or `stop_at`, or a preemption signal); the summary.

        stop_at: leave after this optimizer step with a checkpoint, as a preempted job would;
        the schedule still spans the whole job, so a resume continues exactly.
        """
        t_run = time.perf_counter()
        for _ in self.steps(stop_at):
            pass
        wall = time.perf_counter() - t_run
        if not self._has_final_checkpoint():
            self.save_checkpoint()  # the final state is always on disk
        return self._summary(self.totals, wall)

    def _summary(self, totals: dict, wall: float) -> dict:
        spec, world, pos = self.spec, self.world, self.position
        steps = max(1, totals["steps"])
        timing = self.backend.average({k: totals[k] / steps for k in BUCKETS})
        summary = {
            "name": spec.name, "backend": self.backend.name, "model": spec.model.name, "precision": spec.precision,
            "world": {**world.as_dict(), "size": world.size}, "classes": self.inputs.classes,
            "epochs": pos.epoch, "global_step": pos.global_step,
            "steps_this_run": totals["steps"], "resumed_from": self.resumed_from, "preempted": self.preempted,
            "wall_seconds": wall, "samples_per_s": totals["samples"] / wall if wall > 0 else 0.0,
            "step_time_breakdown_s": timing, "final": self.last_eval,
            "target_accuracy": spec.target_accuracy,
            "reached_target": (self.last_eval.get("val_accuracy", 0) >= spec.target_accuracy)
            if spec.target_accuracy else None,
            "versions": versions(), "fingerprint": spec.fingerprint(),
        }
        for cb in self.callbacks:
            cb.on_end(self, summary)
        self.recorder.finish(summary)
        if world.rank == 0:
            self.log.info("done: %d steps in %.1f s, %.0f samples/s; %s", totals["steps"], wall,
                          summary["samples_per_s"],
                          _shown(self.last_eval) or "no held-out split")
        return summary

    def close(self) -> None:
        """Release the model before the backend: a DDP model must go before its process group."""
        self.model = self.net = self.optimizer = self.scheduler = None
        gc.collect()
        self.backend.close()


def train(spec: JobSpec, resume: Union[bool, str] = False, stop_at: Optional[int] = None,
          objective: Optional[Objective] = None, callbacks: Sequence[Callback] = (), overwrite: bool = False,
          world=None) -> dict:
    """Run the job; returns the summary (on every rank; rank 0 also writes it).

    resume: True continues from the newest checkpoint (BadInput if none); "auto" does so when
    there is one (a requeued job) and starts fresh otherwise. A fresh start into a run folder
    that holds another run's checkpoints is refused unless `overwrite` (which clears them).
    """
    trainer = Trainer(spec, resume=resume, objective=objective, callbacks=callbacks, overwrite=overwrite, world=world)
    summary = trainer.fit(stop_at=stop_at)
    trainer.close()  # not on an exception: fail-fast ends the job, and close() is a collective
    return summary
