"""The training loop: one JobSpec, any launcher, any backend.

    trainer = Trainer(spec, resume=False, objective=None, callbacks=())   # set up (collective)
    summary = trainer.fit(stop_at=None)                                   # run; rank 0 writes the record

or `train(spec, ...)`, which does both and releases the backend. A Trainer is a `Run` (the run
folder's lock, resume, checkpoints, the preemption agreement, the record: the parts a user's
own loop gets from `mpidl.Run`) whose parts a job spec names, and whose step it takes itself.
The pieces are separate modules: `inputs` (data, loaders), `models`, `optim` (optimizer,
schedule), `objectives` (the loss of a step), `evaluate`, `run` (the run's life), `state` (what a
checkpoint holds, where a resume continues), `record` (metrics, progress, summary),
`callbacks` (what a workload adds to the loop).

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
import logging
import time
from typing import Iterator, Optional, Sequence, Union

import torch

import mpidl
from mpidl import log, usercode, watchdog
from mpidl.spec import JobSpec
from mpidl.train.backends import make_backend
from mpidl.train.callbacks import Callback
from mpidl.train.evaluate import evaluate
from mpidl.train.finite import FiniteLoss
from mpidl.train.inputs import build_inputs, steps_per_epoch, with_classes
from mpidl.train.models import model_for
from mpidl.train.objectives import Objective
from mpidl.train.optim import build_optimizer, build_scheduler, lr_scale
from mpidl.train.rng import step_seed
from mpidl.train.run import BUCKETS, Preempted, Run
from mpidl.train.workloads import workload_pieces


def _shown(metrics: dict) -> str:
    return " ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items())


class Trainer(Run):
    """One job on this rank. The constructor sets everything up (a collective); `fit` runs it."""

    log: logging.Logger  # type: ignore[assignment]  # a logger in place of Run.log: a Trainer records its own metrics

    def __init__(self, spec: JobSpec, resume: Union[bool, str] = False, objective: Optional[Objective] = None,
                 callbacks: Sequence[Callback] = (), overwrite: bool = False, world=None):
        world = world or mpidl.init()  # a World over part of the job (a sweep's task) or all of it
        # The watchdog watches the set-up too (data generation, label scans, staging, resume);
        # the Run below takes it over.
        mine = watchdog.start(world, spec.watchdog_s)
        self.log = log.get()
        device = torch.device(world.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.manual_seed(spec.seed)
        # Your code, imported on every rank before anything is read or written: a missing module
        # or attribute, or an import that raises, is one line and exit 2 on every rank.
        world.agree(lambda: [usercode.resolve(name, key, spec.code_dirs) for key, name in spec.code_targets()])

        self.inputs = build_inputs(spec, world)
        # The class count the labels gave, where the spec gives none: the model, a distillation
        # student and the checkpoint's copy of the spec all take it from here.
        self.spec = spec = with_classes(spec, self.inputs.classes)
        spe = steps_per_epoch(spec, world, self.inputs)
        spec_objective, spec_callbacks = world.agree(lambda: workload_pieces(spec, world, self.inputs, device))
        self.objective = objective or spec_objective
        self.callbacks = [*spec_callbacks, *callbacks]

        backend = world.agree(lambda: make_backend(spec.backend, world, {
            **spec.model_dump().get(spec.backend, {}), "backward_passes_per_step": spec.accumulate}))
        model = world.agree(lambda: model_for(spec, self.inputs.train_source)).to(device)
        self.channels_last = spec.model.channels_last
        if self.channels_last and backend.channels_last_weights:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(spec, model, spec.optimizer.lr * lr_scale(spec, world.size))

        ck = spec.checkpoint
        super().__init__(spec.run_dir, model, optimizer, self.inputs.loader, steps=spec.steps, epochs=spec.epochs,
                         backend=backend, world=world, resume=resume, overwrite=overwrite, seed=spec.seed,
                         checkpoint_every_steps=ck.every_steps, checkpoint_every_epochs=ck.every_epochs,
                         checkpoint_every_minutes=ck.every_minutes, keep=ck.keep, checkpoint_dir=spec.checkpoint_dir,
                         log_every=spec.log_every, watchdog_s=spec.watchdog_s,
                         name=spec.name, fingerprint=spec.fingerprint(), steps_per_epoch=spe,
                         batches_per_step=spec.accumulate, spec=spec.redacted_dump(), averaging_step=False)
        self.watchdog, self._own_watchdog = mine, mine is not None
        state = self.restored
        if state is not None and not self.same_world:
            for g in self.optimizer.param_groups:  # the scaled lr follows the new world size
                g["initial_lr"] = spec.optimizer.lr * lr_scale(spec, world.size)
        if spec.model.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]  # compiling a Module gives a Module (OptimizedModule)
            watchdog.watch_compilation()  # its compilations are phases of their own (see mpidl.watchdog)
        self.scheduler = build_scheduler(spec, self.optimizer, world.size, self.steps_per_epoch, self.total_steps,
                                         self.position.global_step,
                                         state["scheduler"] if state is not None and self.same_world else None)
        self.restored = state = None

        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if spec.precision == "bf16"
                         else contextlib.nullcontext())
        self._sync_device = (torch.cuda.synchronize if self.device.type == "cuda" and spec.timing == "sync"
                             else (lambda: None))
        self.finite = FiniteLoss(world.rank, lagged=self.device.type == "cuda")
        self.lagged_metrics = self.device.type == "cuda"
        self.window = self._new_window()
        self.log.info("%s: %s on %d rank(s) (%s), backend %s, %d steps/epoch × %d epochs, batch %d/rank",
                      spec.name, spec.model.name, world.size, world.launcher, backend.name, self.steps_per_epoch,
                      self.epochs_total, spec.data.batch)

    @property
    def last_eval(self) -> dict:
        """The newest held-out metrics (the summary's `final`)."""
        return self.final

    # ------------------------------------------------------------------ pieces
    def _new_window(self) -> dict:
        return {"loss": 0.0, "count": 0.0, "time": 0.0, "steps": 0,
                **{k: 0.0 for k in self.objective.counts_keys()}, **{k: 0.0 for k in BUCKETS}}

    def train_step(self, batches: Iterator, window: Optional[dict] = None) -> dict[str, float]:
        """One optimizer step (accumulating `spec.accumulate` batches); its time per bucket."""
        spec, world, backend, model, optimizer = self.spec, self.world, self.backend, self.model, self.optimizer
        window = self.window if window is None else window
        step = self.position.global_step
        # The generators of this device only: torch.manual_seed would also queue a seed for
        # every lazy accelerator module, formatting a stack trace each time (~0.3 ms a step).
        seed = step_seed(spec.seed, step, world.rank)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        self.inputs.train_transform.generator.manual_seed(step_seed(spec.seed + 1, step, world.rank))
        t0 = time.perf_counter()
        t_data = t_compute = 0.0
        # the first step of a run may take long (cold files, lazy set-up, compilation): LONG
        factor = watchdog.LONG if not self.totals["steps"] else 1
        for micro in range(spec.accumulate):
            ta = time.perf_counter()
            watchdog.mark("data", f"waiting for a batch of step {step + 1}", factor, reads=True)
            x, y = next(batches)
            watchdog.mark("step", f"forward/backward of step {step + 1}", factor)
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
        with watchdog.waiting(f"the gradient allreduce of step {step + 1}"):
            backend.sync_gradients(model, optimizer)
            self._sync_device()
        watchdog.mark("optimizer", f"the optimizer step of step {step + 1}")
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

    def log_window(self) -> None:
        """The training record of the steps since the last one (a collective)."""
        window, self.window = self.window, self._new_window()
        spec, pos = self.spec, self.position
        keys = ["loss", "count", "time", *self.objective.counts_keys(), *BUCKETS]
        avg = self.backend.average({k: window[k] for k in keys})
        n = window["steps"]
        rec = {"step": pos.global_step, "epoch": self._epoch_float(),
               "loss": avg["loss"] / avg["count"], "lr": self.optimizer.param_groups[0]["lr"],
               "step_time": avg["time"] / n,
               "samples_per_s": n * spec.data.batch * spec.accumulate * self.world.size / avg["time"]}
        for name, key in self.objective.ratios.items():
            rec[name] = avg[key] / avg["count"]
        rec["time"] = {k: avg[k] / n for k in BUCKETS}
        watchdog.observe_step_time(rec["step_time"])
        for cb in self.callbacks:
            cb.on_record(self, rec)
        self.recorder.write(rec)
        shown = " ".join(f"{name} {rec[name]:.3f}" for name in self.objective.ratios)
        self.recorder.show(f"epoch {pos.epoch + 1}/{self.epochs_total} step {pos.step_in_epoch}/{self.steps_per_epoch} "
                           f"loss {rec['loss']:.4f}" + (f" {shown}" if shown else "")
                           + f" {rec['samples_per_s']:.0f} samples/s")

    def evaluate(self) -> dict:
        """Held-out metrics of the current model (a collective)."""
        return evaluate(self.world, self.backend, self.model, self.net, self.inputs.val_loader, self.objective,
                        self.autocast, self.channels_last)

    def evaluate_and_log(self) -> dict:
        res = self.evaluate()
        if res:
            rec = {"step": self.position.global_step, "epoch": self._epoch_float(), **res}
            for cb in self.callbacks:
                cb.on_record(self, rec)
            self.recorder.write(rec)
            self.recorder.show(f"epoch {rec['epoch']:.2f}/{self.epochs_total} " + _shown(res), final=True)
        self.final = res
        return res

    def save_checkpoint(self, extra: Optional[dict] = None) -> None:
        """Rank 0 writes the checkpoint of the current step atomically (a collective)."""
        self.finite.check()  # never save weights that a non-finite loss has reached
        # where the spec's code is found, for whoever rebuilds the model (quantize, a teacher)
        super().save_checkpoint({"code_dirs": [str(d) for d in self.spec.code_dirs], **(extra or {})})

    # ------------------------------------------------------------------ the loop
    def steps(self, stop_at: Optional[int] = None) -> Iterator:
        """Train, yielding the position after every optimizer step and its bookkeeping (the log
        record, checkpoints, the evaluation at an epoch's end). `fit` runs it to the end; a
        benchmark can drive it one step at a time."""
        pos, spe = self.position, self.steps_per_epoch
        self.end = min(self.total_steps, stop_at) if stop_at is not None else self.total_steps
        for cb in self.callbacks:
            cb.on_start(self)
        self.model.train()
        self._open_signals()
        try:
            for _ in self._epochs():
                batches = iter(self.loader)
                try:
                    while pos.step_in_epoch < spe and pos.global_step < self.end:
                        self.step_done(self.train_step(batches))
                        if pos.step_in_epoch < spe:
                            yield pos
                finally:
                    batches.close()
                if pos.step_in_epoch == spe:
                    self.evaluate_and_log()
                    yield pos
        except Preempted:
            pass
        except BaseException:
            # No wait for the preemption check in flight: the other ranks may never reach MPI
            # again (blocked in a Gloo or NCCL collective): fail-fast must end them.
            self._close_signals(failed=True)
            raise
        self._close_signals(failed=False)
        if not self.preempted and pos.global_step == self.total_steps and pos.step_in_epoch:
            self.evaluate_and_log()  # a job of `steps` that ends mid-epoch

    def fit(self, stop_at: Optional[int] = None) -> dict:
        """Train to the end of the job (or `stop_at`, or a preemption signal); the summary.

        stop_at: leave after this optimizer step with a checkpoint, as a preempted job would;
        the schedule still spans the whole job, so a resume continues exactly.
        """
        self._t_start = time.perf_counter()
        for _ in self.steps(stop_at):
            pass
        spec = self.spec
        summary = self.finish({
            "model": spec.model.name, "precision": spec.precision, "classes": self.inputs.classes,
            "target_accuracy": spec.target_accuracy,
            "reached_target": (self.final.get("val_accuracy", 0) >= spec.target_accuracy)
            if spec.target_accuracy else None})
        for cb in self.callbacks:
            cb.on_end(self, summary)
        self.write_summary(summary)
        if self.world.rank == 0:
            self.log.info("done: %d steps in %.1f s, %.0f samples/s; %s", self.totals["steps"],
                          summary["wall_seconds"], summary["samples_per_s"], _shown(self.final) or "no held-out split")
        return summary

    def close(self) -> None:
        """Release the model before the backend: a DDP model must go before its process group.
        The loaders' staged files go too (a requeued job stages again)."""
        self.inputs.loader.close()
        if self.inputs.val_loader is not None:
            self.inputs.val_loader.close()
        self.model = self.net = self.optimizer = self.scheduler = None  # type: ignore[assignment]  # released at the end
        gc.collect()
        self.backend.close()
        self.release()
        self.stop_watchdog()


def train(spec: JobSpec, resume: Union[bool, str] = False, stop_at: Optional[int] = None,
          objective: Optional[Objective] = None, callbacks: Sequence[Callback] = (), overwrite: bool = False,
          world=None) -> dict:
    """Run the job; returns the summary (on every rank; rank 0 also writes it).

    resume: True continues from the newest checkpoint (BadInput if none); "auto" does so when
    there is one (a requeued job) and starts fresh otherwise. A fresh start into a run folder
    that holds another run's checkpoints is refused unless `overwrite` (which clears them).
    """
    trainer = Trainer(spec, resume=resume, objective=objective, callbacks=callbacks, overwrite=overwrite, world=world)
    try:
        summary = trainer.fit(stop_at=stop_at)
    except BaseException:
        trainer.release()  # a sweep's failed task: its folder is free again
        raise
    trainer.close()  # not on an exception: fail-fast ends the job, and close() is a collective
    return summary
