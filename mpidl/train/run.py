"""A training run: its folder, checkpoints, resume, preemption and record, around any loop.

Your own loop, data-parallel and preemption-safe (`examples/` has it beside the plain loop):

    world = mpidl.init()
    loader = mpidl.ShardedLoader(mpidl.H5Source("train.h5"), world, batch_size=64)
    with mpidl.Run("runs/mine", model, optimizer, loader, epochs=10) as run:
        model, optimizer = run.model, run.optimizer     # wrapped for the backend
        for epoch in run.epochs():
            for x, y in run.batches():                  # this rank's share, on its device
                loss = loss_fn(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()                        # the gradients averaged over the ranks first
                run.log(loss=loss)

What a Run does, for your loop and for `mpidl train` (whose Trainer drives one):

- holds the run folder's lock (`mpidl.runlock`): one job at a time in a folder;
- resumes from the folder's newest checkpoint (`resume="auto"`): the model, the optimizer, a
  scheduler, the RNG and the loader's position, so the run continues bit for bit on CPU; on
  another world size the epoch re-shards;
- wraps model and optimizer for the backend (horovod, ddp, mpi, or none) and broadcasts rank 0's
  weights; `optimizer.step()` averages the gradients first on every backend;
- at every step boundary agrees with the other ranks on a preemption signal (SIGUSR2, SIGTERM;
  `mpidl.preemption`) at no synchronisation cost; when one came, it writes a checkpoint and leaves
  the `with` block: under `mpidl submit` the job requeues itself and resumes, else exit 3;
- checkpoints atomically every `checkpoint_every_steps` steps, every `checkpoint_every_epochs`
  epochs and at the end; an exception on any rank ends the job at once (`mpidl.init`'s fail-fast);
- writes `metrics.jsonl` (a record every `log_every` steps: the mean of what `run.log` was given,
  lr, step time and its split into data / compute / sync / optimizer, samples/s) and
  `summary.json`, as `mpidl train` does: studies, reports and `mpidl check` read both alike.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
import types
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import torch
from torch import nn

from mpidl import log, preemption, watchdog
from mpidl.check import DIR_ENV as CHECK_DIR_ENV
from mpidl.errors import BadInput
from mpidl.runlock import RunLock
from mpidl.train import checkpoint
from mpidl.train.backends import Backend, make_backend
from mpidl.train.record import Recorder, versions
from mpidl.train.state import (
    Position,
    float_buffers,
    fresh_run_dir,
    read_latest,
    restore_rng,
    resume_position,
    snapshot,
)
from mpidl.world import before_finalize, init

BUCKETS = ("data", "compute", "sync", "optimizer")

# Set by the scripts `mpidl submit` writes: a preempted run requeues its SLURM job.
REQUEUE_ENV, REQUEUE_LIMIT_ENV = "MPIDL_REQUEUE", "MPIDL_REQUEUE_LIMIT"
# Set by `mpidl scale`, `mpidl check` and `mpidl submit --array` for the runs they start, and
# taking precedence over what the script says: the backend, the run folder, the run's length
# in optimizer steps.
BACKEND_ENV, OUTPUT_ENV, STEPS_ENV, LOG_EVERY_ENV = "MPIDL_BACKEND", "MPIDL_OUTPUT", "MPIDL_STEPS", "MPIDL_LOG_EVERY"


def _positive(text: str, name: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise BadInput(f"{name}={text!r}: a number of steps, at least 1")
    return int(text)


class Preempted(Exception):
    """Raised at a step boundary once the ranks agreed on a preemption signal (its name)."""


def model_fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int, seed: int) -> str:
    """What a checkpoint of one's own loop must match: parameter names and shapes, the optimizer's
    kind, the batch and seed (not the lr: it scales with the world size)."""
    text = repr(([(k, tuple(v.shape)) for k, v in model.state_dict().items()], type(optimizer).__name__, batch, seed))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Run:
    """One training run on this rank; a `with` block. See the module's documentation.

    output: the run folder. model, optimizer: yours (the optimizer over model's parameters).
    loader: a `ShardedLoader` (`run.batches()` iterates it), or None when you feed batches
    yourself (then give `steps_per_epoch`). epochs or steps: the run's length. scheduler: an lr
    scheduler to checkpoint (step it yourself). backend: horovod, ddp, mpi or none (or a Backend),
    with `backend_options` as a job spec's section of that name (default horovod). MPIDL_BACKEND,
    MPIDL_OUTPUT, MPIDL_STEPS and MPIDL_LOG_EVERY, when set (by `mpidl scale`, `mpidl check`,
    `mpidl submit --array`), take precedence over the backend, output, length and log_every given here.
    resume: "auto" continues from the
    newest checkpoint when there is one, True requires one, False starts afresh (refused where the
    folder holds checkpoints, unless `overwrite`). fingerprint: what a checkpoint must match
    (default: `model_fingerprint`).
    """

    def __init__(self, output: Union[str, Path], model: nn.Module, optimizer: torch.optim.Optimizer, loader=None, *,
                 epochs: Optional[int] = None, steps: Optional[int] = None, scheduler=None,
                 backend: Union[str, Backend, None] = None, backend_options: Optional[dict] = None, world=None,
                 resume: Union[bool, str] = "auto", overwrite: bool = False, seed: int = 0,
                 checkpoint_every_steps: Optional[int] = None, checkpoint_every_epochs: Optional[int] = 1,
                 checkpoint_every_minutes: Optional[float] = None, watchdog_s: Optional[float] = None,
                 keep: int = 2, checkpoint_dir: Union[str, Path, None] = None, log_every: int = 20,
                 name: Optional[str] = None, fingerprint: Optional[str] = None,
                 steps_per_epoch: Optional[int] = None, batches_per_step: int = 1,
                 spec: Optional[dict] = None, averaging_step: bool = True):
        self.world = world = world or init()
        if averaging_step and os.environ.get(REQUEUE_ENV) == "1":  # under `mpidl submit -- CMD`
            code = preemption.too_many_restarts(world, int(os.environ.get(REQUEUE_LIMIT_ENV, "3")))
            if code:
                raise SystemExit(code)
        # From here on a rank that makes no progress ends the job, named (mpidl/watchdog.py); the
        # Trainer starts it before its set-up, a Run of your own loop here.
        running = watchdog.current()
        self._own_watchdog = running is None or running.world is not world
        self.watchdog = watchdog.start(world, watchdog_s) if self._own_watchdog else running
        self.device = torch.device(world.device)
        if averaging_step:  # your loop: a study or a check may point it elsewhere
            output = os.environ.get(OUTPUT_ENV) or output
            backend = os.environ.get(BACKEND_ENV) or backend
            if os.environ.get(STEPS_ENV):
                steps = _positive(os.environ[STEPS_ENV], STEPS_ENV)
            if os.environ.get(LOG_EVERY_ENV):
                log_every = _positive(os.environ[LOG_EVERY_ENV], LOG_EVERY_ENV)
        self.run_dir = Path(output)
        self.name = name or self.run_dir.name
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else self.run_dir / "checkpoints"
        self.loader, self.batches_per_step, self.seed = loader, batches_per_step, seed
        self.every_steps, self.every_epochs, self.keep, self.log_every = (checkpoint_every_steps,
                                                                          checkpoint_every_epochs, keep, log_every)
        self.every_minutes = checkpoint_every_minutes
        spe = steps_per_epoch or (len(loader) // batches_per_step if loader is not None else None)
        if not spe or (epochs is None and steps is None):
            raise BadInput(f"Run {self.run_dir}: give epochs or steps, and a loader or steps_per_epoch")
        self.steps_per_epoch = spe
        self.total_steps = steps or epochs * spe  # type: ignore[operator]  # epochs is None only when steps is given (checked above)
        self.epochs_total = math.ceil(self.total_steps / spe)
        self.end = self.total_steps
        self.spec_record = spec  # the job spec a checkpoint holds (None for one's own loop)
        self.batch = loader.batch_size if loader is not None else None
        self.fingerprint = fingerprint or model_fingerprint(model, optimizer, self.batch or 0, seed)
        backend = backend or "horovod"
        self.backend = backend if isinstance(backend, Backend) else world.agree(
            lambda: make_backend(backend, world, dict(backend_options or {})))

        # One job at a time in a run folder (rank 0 holds the lock until the run ends).
        self.lock = RunLock(self.run_dir) if world.rank == 0 else None
        world.agree(lambda: self.lock and self.lock.acquire())
        if self.lock is not None:
            before_finalize(self.lock.release)  # a bad-input exit from here on leaves no lock behind
        try:
            self._set_up(model, optimizer, scheduler, resume=resume, overwrite=overwrite, spe=spe,
                         batches_per_step=batches_per_step, averaging_step=averaging_step)
        except BaseException:
            if self.lock is not None:  # refused or failed before the run began: another process may use the folder
                self.lock.release()
            raise

    def _set_up(self, model, optimizer, scheduler, *, resume, overwrite, spe, batches_per_step, averaging_step):
        """The rest of `__init__`, under the run folder's lock: the folder's state, the checkpoint
        resumed from, the backend's model and optimizer, the recorder."""
        world = self.world
        if not resume:
            world.agree(lambda: fresh_run_dir(self.run_dir, self.checkpoint_dir, world, overwrite))
        state = read_latest(self.checkpoint_dir, self.fingerprint, world, resume) if resume else None

        # Rank 0's checkpoint is on every rank: each restores it, nothing is broadcast.
        self.position, self.resumed_from = Position(), None
        if state is not None:
            model.load_state_dict(state["model"])
            restore_rng(state)
            per_step = (self.batch or 1) * batches_per_step
            self.position = resume_position(state, per_step, world, spe)
            self.resumed_from = state["path"]
            p = self.position
            log.get().info("resumed from %s at epoch %d, step %d (global %d)", self.resumed_from, p.epoch,
                           p.step_in_epoch, p.global_step)
        self.same_world = state is not None and state["world_size"] == world.size
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.model, self.optimizer = self.backend.prepare(model, optimizer)  # rank 0's weights everywhere
        if state is not None:
            # Into the optimizer the backend returned: Horovod's wrapper is a new optimizer that
            # starts with empty state.
            self.optimizer.load_state_dict(state["optimizer"])
        self.net = self.backend.unwrap(self.model)  # the plain module: its state_dict is what checkpoints hold
        if state is not None and self.same_world:  # each rank takes back its own BatchNorm statistics
            for k, b in float_buffers(self.net).items():
                b.copy_(state["rank_buffers"][world.rank][k])
        self.scheduler = scheduler
        if scheduler is not None and state is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        #: the checkpoint resumed from, for a driver that restores more (`mpidl train`'s schedule); then dropped
        self.restored: Optional[dict] = state
        if averaging_step:
            self._average_in_step()
        # Under `mpidl check -- CMD`: what this rank sees, for the check (mpidl/check/probe.py).
        self._probe = None
        if averaging_step and os.environ.get(CHECK_DIR_ENV):
            from mpidl.check.probe import from_env

            self._probe = from_env()

        self.recorder = Recorder(world, self.run_dir, append=self.resumed_from is not None)
        # A warning signal during set-up (label scan, standardisation, staging): stop before the
        # first step, with a checkpoint, as at any step boundary.
        self.preempted: Optional[str] = preemption.agreed_now(world)
        self.totals: dict[str, float] = {**{k: 0.0 for k in BUCKETS}, "steps": 0, "samples": 0}
        self.window: dict[str, Any] = {}
        self.final: dict = {}
        self._signals: Optional[preemption.Preemption] = None
        self._batches: Optional[Iterator] = None
        self._saved_at: Optional[int] = None
        self._left = False
        self._agreed_keys: list[str] = []
        self._t_start = time.perf_counter()
        self._saved_clock = time.monotonic()  # this rank's clock at the last checkpoint (every_minutes)
        self._times = {k: 0.0 for k in BUCKETS}

    # ------------------------------------------------------------------ your loop
    def epochs(self) -> Iterator[int]:
        """The epochs left to train (a resumed run starts in the one it stopped in). When they are
        done: the final checkpoint and summary, and the run folder is free again."""
        self._open_signals()
        try:
            for epoch in self._epochs():
                watchdog.mark("your code", f"epoch {epoch + 1}, outside run.batches()", factor=watchdog.LONG)
                yield epoch
        except Preempted:
            pass
        self._leave()

    def batches(self) -> Iterator[Any]:
        """This epoch's batches left, one an optimizer step, on this rank's device. After each
        step: the record, a checkpoint when due, and the ranks' agreement on a preemption signal;
        once they agreed, a checkpoint, and the job leaves (`SystemExit`: requeued under `mpidl
        submit`, else exit 3)."""
        if self.loader is None:
            raise BadInput("Run.batches(): this run was given no loader")
        source = iter(self.loader)
        try:
            for pos in self.epoch_steps():
                # the first step of a run may take long (cold files, lazy set-up): LONG
                factor = watchdog.LONG if not self.totals["steps"] else 1
                watchdog.mark("data", f"waiting for the batch of step {pos.global_step + 1}", factor, reads=True)
                t0 = time.perf_counter()
                batch = next(source)
                self._times["data"] += time.perf_counter() - t0
                watchdog.mark("step", f"your step {pos.global_step + 1} (forward, backward)", factor)
                yield batch
        except Preempted:
            source.close()
            self._leave()
        finally:
            source.close()
        watchdog.mark("your code", f"after the batches of epoch {self.position.epoch + 1}, outside run.batches()",
                      factor=watchdog.LONG)

    def __enter__(self) -> "Run":
        self._open_signals()
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        """Leaving the block: as the end of `epochs()` (nothing more after it), unless an error left it."""
        if exc_type is not None and not issubclass(exc_type, Preempted):
            self._close_signals(failed=True)
            return False  # an error: fail-fast ends the job (the lock is taken over next time)
        self._leave()
        return False

    def _leave(self) -> None:
        """The end of the run: the final checkpoint and summary, the lock released; after a
        preemption, requeue (under `mpidl submit`) or exit 3, on every rank alike."""
        if self._left:
            return
        self._left = True
        self._close_signals(failed=False)
        summary = self.finish()
        if self._probe is not None:
            self._probe.on_end(self, summary)
        self.write_summary(summary)
        self.release()
        if self.loader is not None:
            self.loader.close()  # its staged files go (a requeued job stages again)
        self.stop_watchdog()
        if self.preempted:
            limit = int(os.environ.get(REQUEUE_LIMIT_ENV, "3"))
            requeue_fn = preemption.scontrol_requeue() if os.environ.get(REQUEUE_ENV) == "1" else None
            raise SystemExit(preemption.after_preemption(self.world, summary, limit, requeue_fn))

    def log(self, **values) -> None:
        """Values of this step (a loss, a count): the record holds their mean over the steps since
        the last record and over the ranks. A GPU's tensors stay on it until then (no host sync a
        step); on the CPU a host read costs less than a tensor addition."""
        window = self.window
        for k, v in values.items():
            if torch.is_tensor(v):
                v = v.detach().double() if v.is_cuda else v.item()
            window[k] = window.get(k, 0.0) + v

    def log_eval(self, **values) -> None:
        """Held-out metrics of the model now (each already over all ranks): a record, and the
        summary's `final`."""
        pos = self.position
        self.recorder.write({"step": pos.global_step, "epoch": self._epoch_float(), **values})
        self.recorder.show(f"epoch {self._epoch_float():.2f}/{self.epochs_total} "
                           + " ".join(f"{k} {v:.4f}" for k, v in values.items()), final=True)
        self.final = dict(values)

    def progress(self, what: Optional[str] = None) -> None:
        """Tell the watchdog that your own code makes progress: long work between epochs (your own
        evaluation, say) calls this now and then; `what` names it in the line a hang prints."""
        if what is None:
            watchdog.touch()
        else:
            watchdog.mark("your code", what, factor=watchdog.LONG)

    def average(self, values: dict[str, float]) -> dict[str, float]:
        """`values` averaged over the ranks (one allreduce)."""
        return self.backend.average(values)

    # ------------------------------------------------------------------ for any driver
    def _epochs(self) -> Iterator[int]:
        """The epochs left; raises Preempted when the ranks agreed to stop before one."""
        pos = self.position
        while pos.epoch < self.epochs_total and pos.global_step < self.end:
            if self.preempted:
                raise Preempted(self.preempted)
            if self.loader is not None:
                self.loader.set_epoch(pos.epoch, start_step=pos.step_in_epoch * self.batches_per_step)
            yield pos.epoch
            if pos.step_in_epoch < self.steps_per_epoch:
                break  # stopped inside the epoch: the run's end (or a driver's stop_at)
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
            if self.every_epochs and pos.epoch % self.every_epochs == 0 and self._saved_at != pos.global_step:
                self.save_checkpoint()
        if self.preempted:
            raise Preempted(self.preempted)

    def epoch_steps(self) -> Iterator[Position]:
        """This epoch's optimizer steps left; after each, its bookkeeping: the preemption check at
        the boundary, the record, a checkpoint when one is due. Raises Preempted when the ranks
        agreed to stop."""
        pos, spe = self.position, self.steps_per_epoch
        while pos.step_in_epoch < spe and pos.global_step < self.end:
            if self.preempted:
                raise Preempted(self.preempted)
            started = time.perf_counter()
            yield pos
            seconds = time.perf_counter() - started
            times = dict(self._times)
            times["compute"] = max(0.0, seconds - sum(times.values()))
            for k in BUCKETS:
                self.window[f"time_{k}"] = self.window.get(f"time_{k}", 0.0) + times[k]
            self.window["time"] = self.window.get("time", 0.0) + seconds
            self.window["steps"] = self.window.get("steps", 0) + 1
            self.step_done(times)

    def step_done(self, times: dict) -> None:
        """Count one optimizer step, its time split into `times`' buckets: the position, the
        agreement on a preemption signal, the record and a checkpoint when due. Raises Preempted
        once the ranks agreed to stop (after the record and checkpoint)."""
        pos, totals = self.position, self.totals
        self._times = {k: 0.0 for k in BUCKETS}
        for k in BUCKETS:
            totals[k] += times[k]
        totals["steps"] += 1
        totals["samples"] += (self.batch or 0) * self.batches_per_step * self.world.size
        pos.step_in_epoch += 1
        pos.global_step += 1
        assert self._signals is not None, "a step outside the Run's `with` block"
        self.preempted, due = self._signals.check(self._minutes_passed)
        if (pos.global_step % self.log_every == 0 or pos.step_in_epoch == self.steps_per_epoch
                or pos.global_step == self.end or self.preempted):
            self.log_window()
        if self.every_steps and pos.global_step % self.every_steps == 0:
            self.save_checkpoint()
        elif due and self._saved_at != pos.global_step - 1:
            # every_minutes: agreed one step late, so no new synchronisation point; the flag sent
            # before a checkpoint of the step just before is already satisfied
            self.save_checkpoint()
        if self.preempted:
            raise Preempted(self.preempted)

    def _minutes_passed(self) -> bool:
        """Whether checkpoint.every_minutes have passed on this rank's clock since its last checkpoint."""
        m = self.every_minutes
        return m is not None and m > 0 and time.monotonic() - self._saved_clock >= 60 * m

    def log_window(self) -> None:
        """The record of the steps since the last one (a collective): the mean of each value."""
        window, self.window = self.window, {}
        n = window.pop("steps", 0)
        if not n:
            return
        keys = sorted(window)
        if self.world.size > 1 and keys != self._agreed_keys:  # one allreduce over the same keys everywhere
            with watchdog.waiting("the ranks' agreement on the keys run.log was given"):
                every = self.world.comm.allgather(keys)
            odd = next((r for r, k in enumerate(every) if k != every[0]), None)
            if odd is not None:
                shown = lambda ks: ", ".join(k for k in ks if not k.startswith("time")) or "nothing"  # noqa: E731
                raise BadInput(f"run.log: rank 0 logged {shown(every[0])}, rank {odd} {shown(every[odd])}: "
                               "log the same values on every rank", collective=True, origin=odd)
            self._agreed_keys = keys
        avg = self.backend.average({k: float(window[k]) for k in keys})
        rec: dict[str, Any] = {"step": self.position.global_step, "epoch": self._epoch_float()}
        rec.update({k: avg[k] / n for k in keys if not k.startswith("time")})
        rec["lr"] = self.optimizer.param_groups[0]["lr"]
        rec["step_time"] = avg["time"] / n
        if self.batch:
            rec["samples_per_s"] = n * self.batch * self.batches_per_step * self.world.size / avg["time"]
        rec["time"] = {k: avg[f"time_{k}"] / n for k in BUCKETS}
        watchdog.observe_step_time(rec["step_time"])
        self.recorder.write(rec)
        logged = " ".join(f"{k} {rec[k]:.4f}" for k in keys if not k.startswith("time"))
        self.recorder.show(f"epoch {self.position.epoch + 1}/{self.epochs_total} step {self.position.step_in_epoch}/"
                           f"{self.steps_per_epoch} {logged}"
                           + (f" {rec['samples_per_s']:.0f} samples/s" if "samples_per_s" in rec else ""))

    def save_checkpoint(self, extra: Optional[dict] = None) -> None:
        """Rank 0 writes the checkpoint of the current step atomically (a collective)."""
        state = snapshot(self.world, self.net, self.optimizer, self.scheduler, self.position, self.fingerprint,
                         self.spec_record, extra)
        if state is not None:
            path = checkpoint.save(self.checkpoint_dir, self.position.global_step, state, self.keep)
            log.get().info("checkpoint %s", path)
        self._saved_at = self.position.global_step
        self._saved_clock = time.monotonic()
        self.world.barrier(f"the barrier while rank 0 writes the checkpoint of step {self.position.global_step}")

    def finish(self, extra: Optional[dict] = None) -> dict:
        """The final checkpoint (unless this step has one) and the summary (rank 0 writes it)."""
        wall = time.perf_counter() - self._t_start
        watchdog.mark("finishing", "the final checkpoint, the summary", factor=watchdog.LONG)
        if self.preempted and self.world.rank == 0:
            log.get().warning("%s received: stopping after step %d with a checkpoint", self.preempted,
                              self.position.global_step)
        if not self._has_checkpoint():
            self.save_checkpoint()  # the final state is always on disk
        world, pos, totals = self.world, self.position, self.totals
        steps = max(1, totals["steps"])
        summary = {
            "name": self.name, "backend": self.backend.name,
            "world": {**world.as_dict(), "size": world.size},
            "epochs": pos.epoch, "global_step": pos.global_step, "steps_this_run": totals["steps"],
            "resumed_from": self.resumed_from, "preempted": self.preempted, "wall_seconds": wall,
            "samples_per_s": totals["samples"] / wall if wall > 0 else 0.0,
            "step_time_breakdown_s": self.backend.average({k: totals[k] / steps for k in BUCKETS}),
            "final": self.final, "versions": versions(), "fingerprint": self.fingerprint,
            "parameters": sum(p.numel() for p in self.net.parameters() if p.requires_grad),
            **(extra or {}),
        }
        return summary

    def write_summary(self, summary: dict) -> None:
        self.recorder.finish(summary)

    def release(self) -> None:
        """The run folder is free again (rank 0's lock removed)."""
        if self.lock is not None:
            self.lock.release()

    def stop_watchdog(self) -> None:
        """The run's watchdog stops (every rank, at the run's end)."""
        if self._own_watchdog and self.watchdog is not None:
            self.watchdog.stop()

    # ------------------------------------------------------------------ pieces
    def _epoch_float(self) -> float:
        return self.position.epoch + self.position.step_in_epoch / self.steps_per_epoch

    def _has_checkpoint(self) -> bool:
        have = checkpoint.path_for(self.checkpoint_dir, self.position.global_step).exists() \
            if self.world.rank == 0 else None
        if self.world.size == 1:
            return bool(have)
        with watchdog.waiting("rank 0's look for the final checkpoint"):
            return self.world.comm.bcast(have, root=0)

    def _open_signals(self) -> None:
        if self._signals is None:
            self._signals = preemption.Preemption(self.world).__enter__()
            self._t_start = time.perf_counter()
            probe = getattr(self, "_probe", None)
            if probe is not None and probe.out is None:
                probe.on_start(self)

    def _close_signals(self, failed: bool) -> None:
        if self._signals is not None:
            self._signals.__exit__(RuntimeError if failed else None, None, None)
            self._signals = None

    def _average_in_step(self) -> None:
        """`optimizer.step()` averages the gradients over the ranks first (any backend), and times
        both parts. Set on the instance, so an lr scheduler made later wraps this step."""
        run, opt, backend = self, self.optimizer, self.backend
        inner = opt.step

        def step(self_opt, *args, **kwargs):
            t0 = time.perf_counter()
            step = run.position.global_step + 1
            with watchdog.waiting(f"the gradient allreduce of step {step}"):
                backend.sync_gradients(run.model, self_opt)
            watchdog.mark("optimizer", f"optimizer.step() of step {step}, and your code after it")
            t1 = time.perf_counter()
            with backend.stepping(self_opt):
                out = inner(*args, **kwargs)
            if run._probe is not None:
                run._probe.after_step(run)
            run._times["sync"] += t1 - t0
            run._times["optimizer"] += time.perf_counter() - t1
            return out

        opt.step = types.MethodType(step, opt)  # type: ignore[method-assign]  # this instance's step, on purpose
