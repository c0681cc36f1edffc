"""The training loop: one JobSpec, any launcher, any backend.

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
  optimizer the parameter update, zeroing gradients and the learning-rate schedule

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
import json
import math
import os
import platform
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

import mpidl
from mpidl import log
from mpidl.data import H5Source, ShardedLoader
from mpidl.data.preprocess import Pipeline, Standardizer
from mpidl.errors import BadInput
from mpidl.spec import JobSpec
from mpidl.train import checkpoint
from mpidl.train.backends import make_backend
from mpidl.train.models import build_model
from mpidl.world import SINGLE


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def ensure_data(spec: JobSpec, world) -> None:
    """Write the synthetic dataset the spec describes if its file is missing (all ranks help)."""
    syn = spec.data.synth
    if syn is None or not isinstance(spec.data.files, str) or any(c in spec.data.files for c in "*?["):
        return
    path = spec.data.files
    missing = not os.path.exists(path) if world.rank == 0 else None
    if world.size > 1:
        missing = world.comm.bcast(missing, root=0)
    if not missing:
        return
    from mpidl.data import synth

    common = dict(seed=syn.seed, world=world)
    if syn.noise is not None:
        common["noise"] = syn.noise
    if syn.kind == "images":
        synth.synth_images(path, syn.rows, classes=syn.classes or 10, channels=syn.channels, size=syn.size, **common)
    else:
        synth.synth_tabular(path, syn.rows, features=syn.features, rule=syn.rule, classes=syn.classes, **common)
    log.get().info("wrote synthetic %s data: %s (%d rows)", syn.kind, path, syn.rows)


def _sources(spec: JobSpec, world) -> tuple[H5Source, Optional[H5Source]]:
    d = spec.data
    full = H5Source(d.files, keys=d.keys)
    world.agree(full.validate)
    if d.val_files is not None:
        val = H5Source(d.val_files, keys=d.keys)
        world.agree(val.validate)
        return full, val
    n = len(full)
    n_val = int(round(n * d.val_fraction))
    if n_val == 0:
        return full, None
    train = H5Source(d.files, keys=d.keys, rows=(0, n - n_val))
    val = H5Source(d.files, keys=d.keys, rows=(n - n_val, n))
    world.agree(train.validate)
    world.agree(val.validate)
    return train, val


def _model(spec: JobSpec, src: H5Source) -> nn.Module:
    args = dict(spec.model.args)
    x_shape, y_key = src.shapes[src.keys[0]], src.keys[1]
    classify = src.dtypes[y_key].kind in "iu"
    name = spec.model.name
    if name in ("linear", "mlp"):
        args.setdefault("in_features", int(np.prod(x_shape)))
    elif len(x_shape) == 3:
        args.setdefault("in_channels", x_shape[0])
    if classify and spec.data.synth is not None and spec.data.synth.classes and name != "linear":
        args.setdefault("num_classes", spec.data.synth.classes)
    if name == "linear" and not classify:
        args.setdefault("out_features", int(np.prod(src.shapes[y_key] or (1,))))
    return build_model(name, **args)


def _optimizer(spec: JobSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def lr_factor(spec: JobSpec, world_size: int, steps_per_epoch: int, total_steps: int):
    """The schedule as a multiplier of the (scaled) base lr, per optimizer step."""
    s = spec.schedule
    scale = world_size if s.scale_lr else 1
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


def _float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b for k, b in model.named_buffers() if b.is_floating_point() and b.numel()}


def averaged_buffers(world, model: nn.Module) -> dict[str, torch.Tensor]:
    """Float buffers (BatchNorm statistics, kept per rank while training) averaged over ranks."""
    out = {}
    for k, b in _float_buffers(model).items():
        arr = b.detach().to("cpu", torch.float64).numpy().copy()
        if world.size > 1:
            from mpi4py import MPI

            world.comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
        out[k] = torch.from_numpy(arr / world.size).to(b.dtype)
    return out


def sync_buffers(world, model: nn.Module) -> None:
    """Make every rank's buffers the average: evaluation sees one model."""
    if world.size > 1:
        for k, avg in averaged_buffers(world, model).items():
            _float_buffers(model)[k].copy_(avg)


class _Progress:
    """A live, rewritten line on a terminal; otherwise a plain line per log interval.

    OpenMPI gives ranks a pty even when mpirun's own output goes to a file or a pipe, so under
    a launcher a rank cannot tell a terminal from a CI log: there it writes plain lines, unless
    MPIDL_PROGRESS=bar asks for the live line (MPIDL_PROGRESS=lines forces plain lines anywhere).
    """

    def __init__(self, enabled: bool, launcher: str):
        self.enabled = enabled
        choice = os.environ.get("MPIDL_PROGRESS", "")
        self.tty = choice == "bar" or (choice != "lines" and launcher == SINGLE and sys.stdout.isatty()
                                       and not os.environ.get("CI") and os.environ.get("TERM", "dumb") != "dumb")

    def show(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stdout.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "mpidl": mpidl.__version__}
    for mod in ("h5py", "mpi4py", "horovod"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def train(spec: JobSpec, resume: bool = False, stop_at: Optional[int] = None) -> dict:
    """Run the job; returns the summary (on every rank; rank 0 also writes it).

    stop_at: leave after this optimizer step with a checkpoint, as a preempted job would;
    the schedule still spans the whole job, so `resume` continues exactly.
    """
    world = mpidl.init()
    logger = log.get()
    device = torch.device(world.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(spec.seed)

    ensure_data(spec, world)
    train_src, val_src = _sources(spec, world)
    d = spec.data
    standardizer = None
    if d.preprocess.standardize:
        standardizer = Standardizer.fit(train_src, world, key=d.keys[0], per=d.preprocess.standardize_per,
                                        cache_dir=str(spec.run_dir))
    pre = d.preprocess
    train_tf = Pipeline(pre.scale_uint8, standardizer, pre.crop, pre.padding, pre.flip, seed=spec.seed, train=True)
    eval_tf = Pipeline(pre.scale_uint8, standardizer, pre.crop, pre.padding, False, seed=spec.seed, train=False)
    loader = ShardedLoader(train_src, world, d.batch, seed=spec.seed, shuffle=d.shuffle, drop_last=d.drop_last,
                           prefetch=d.prefetch, transform=train_tf, stage_dir=d.stage_dir)
    val_loader = None
    if val_src is not None:
        eval_batch = min(d.batch, len(val_src) // world.size)
        if eval_batch >= 1:
            val_loader = ShardedLoader(val_src, world, eval_batch, seed=spec.seed, shuffle="none",
                                       prefetch=2, transform=eval_tf)

    steps_per_epoch = len(loader) // spec.accumulate

    def check_length() -> None:
        if steps_per_epoch < 1:
            raise BadInput(f"data.batch × accumulate = {d.batch} × {spec.accumulate} leaves no full step per "
                           f"epoch on {world.size} ranks ({len(train_src)} training rows)")
    world.agree(check_length)  # every rank finds the same problem: say it once, exit 2 together
    total_steps = spec.steps or spec.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    model = world.agree(lambda: _model(spec, train_src)).to(device)
    if spec.model.channels_last and spec.backend != "horovod":
        # Horovod 0.28 rejects non-contiguous (channels_last) weights and gradients; there the
        # inputs alone are channels_last, which still selects NHWC convolution kernels.
        model = model.to(memory_format=torch.channels_last)
    scale = world.size if spec.schedule.scale_lr else 1
    optimizer = _optimizer(spec, model, spec.optimizer.lr * scale)
    classify = train_src.dtypes[d.keys[1]].kind in "iu"
    fingerprint = spec.fingerprint()

    # ---------------------------------------------------------------- resume
    epoch, step_in_epoch, global_step, resumed_from = 0, 0, 0, None
    sched_state, own_buffers, state = None, None, None
    if resume:
        folder = spec.checkpoint_dir

        def read() -> Optional[dict]:
            if world.rank != 0:
                return None
            found = checkpoint.latest(folder)
            if found is None:
                raise BadInput(f"{folder}: --resume given but no checkpoint (ckpt-*.pt) is there")
            return {"path": str(found), **checkpoint.load(found, fingerprint)}

        state = world.agree(read)
        if world.size > 1:
            state = world.comm.bcast(state, root=0)
        model.load_state_dict(state["model"])
        if state["world_size"] == world.size:
            own_buffers = state["rank_buffers"][world.rank]
        # For code that draws from the global generators; the loop itself reseeds torch each step.
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        resumed_from = state["path"]
        epoch = state["epoch"]
        if state["world_size"] == world.size:
            step_in_epoch, global_step = state["step_in_epoch"], state["global_step"]
            sched_state = state["scheduler"]
        else:  # re-shard: keep the samples consumed in this epoch, in steps of the new size
            seen = state["step_in_epoch"] * state["world_size"] * d.batch * spec.accumulate
            step_in_epoch = min(seen // (world.size * d.batch * spec.accumulate), steps_per_epoch)
            global_step = epoch * steps_per_epoch + step_in_epoch
            logger.warning("resuming a %d-rank checkpoint on %d ranks: epoch %d continues at step %d of %d",
                           state["world_size"], world.size, epoch, step_in_epoch, steps_per_epoch)
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        logger.info("resumed from %s at epoch %d, step %d (global %d)", resumed_from, epoch, step_in_epoch,
                    global_step)

    backend = world.agree(lambda: make_backend(spec.backend, world, {
        **spec.model_dump().get(spec.backend, {}), "backward_passes_per_step": spec.accumulate}))
    model, optimizer = backend.prepare(model, optimizer)  # broadcasts rank 0's weights and buffers
    if state is not None:
        # Into the optimizer the backend returned: Horovod's wrapper is a new optimizer that
        # starts with empty state. Every rank holds rank 0's checkpoint, so no broadcast is needed.
        optimizer.load_state_dict(state["optimizer"])
        if state["world_size"] != world.size:
            for g in optimizer.param_groups:  # the scaled lr follows the new world size
                g["initial_lr"] = spec.optimizer.lr * scale
    net = backend.unwrap(model)  # the plain module: its state_dict is what checkpoints hold
    if own_buffers is not None:  # then each rank takes back its own BatchNorm statistics
        for k, b in _float_buffers(net).items():
            b.copy_(own_buffers[k])
    if spec.model.compile:
        model = torch.compile(model)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec, world.size, steps_per_epoch, total_steps))
    if sched_state is not None:
        scheduler.load_state_dict(sched_state)
    scheduler.last_epoch = global_step
    # LambdaLR's constructor set the step-0 rate; a resumed job continues at its own step.
    for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
        g["lr"] = base * scheduler.lr_lambdas[0](global_step)

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec.precision == "bf16"
                else contextlib.nullcontext())
    loss_fn = nn.CrossEntropyLoss() if classify else nn.MSELoss()
    run_dir = spec.run_dir
    metrics_file = None
    if world.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(run_dir / "metrics.jsonl", "a" if resume else "w")
        logger.info("%s: %s on %d rank(s) (%s), backend %s, %d steps/epoch × %d epochs, batch %d/rank",
                    spec.name, spec.model.name, world.size, world.launcher, backend.name, steps_per_epoch, epochs,
                    d.batch)
    progress = _Progress(world.rank == 0, world.launcher)
    cuda_sync = (torch.cuda.synchronize if device.type == "cuda" and spec.timing == "sync" else (lambda: None))

    def write(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def save_checkpoint() -> None:
        # The saved model has the averaged buffers; each rank's own are kept beside it so a
        # resume on as many ranks continues exactly (saving must not change the training).
        avg = averaged_buffers(world, net)
        mine = {k: b.detach().cpu().clone() for k, b in _float_buffers(net).items()}
        per_rank = world.comm.gather(mine, root=0) if world.size > 1 else [mine]
        if world.rank == 0:
            weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            weights.update(avg)
            state = {"model": weights, "rank_buffers": per_rank, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                     "global_step": global_step, "world_size": world.size, "fingerprint": fingerprint,
                     "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()},
                     "spec": spec.model_dump(mode="json")}
            path = checkpoint.save(spec.checkpoint_dir, global_step, state, spec.checkpoint.keep)
            logger.info("checkpoint %s", path)
        world.barrier()

    def evaluate() -> dict:
        if val_loader is None:
            return {}
        sync_buffers(world, net)
        model.eval()
        loss_sum, correct, count = 0.0, 0.0, 0.0
        with torch.no_grad(), autocast:
            val_loader.set_epoch(0)
            for x, y in val_loader:
                x = x.to(memory_format=torch.channels_last) if spec.model.channels_last and x.ndim == 4 else x
                out = model(x)
                target = y if classify else y.float().reshape(out.shape)
                loss_sum += float(loss_fn(out.float(), target)) * x.shape[0]
                if classify:
                    correct += float((out.argmax(1) == y).sum())
                count += x.shape[0]
        model.train()
        avg = backend.average({"loss": loss_sum, "correct": correct, "count": count})
        res = {"val_loss": avg["loss"] / avg["count"]}
        if classify:
            res["val_accuracy"] = avg["correct"] / avg["count"]
        return res

    def evaluate_and_log() -> dict:
        res = evaluate()
        if res:
            at = epoch + step_in_epoch / steps_per_epoch
            write({"step": global_step, "epoch": at, **res})
            progress.show(f"epoch {at:.2f}/{epochs} " + " ".join(f"{k} {v:.4f}" for k, v in res.items()), final=True)
        return res

    totals = {"data": 0.0, "compute": 0.0, "sync": 0.0, "optimizer": 0.0, "steps": 0, "samples": 0}
    window = {"loss": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0, "steps": 0}
    last_eval: dict = {}
    t_run = time.perf_counter()
    model.train()
    end = min(total_steps, stop_at) if stop_at is not None else total_steps
    while epoch < epochs and global_step < end:
        loader.set_epoch(epoch, start_step=step_in_epoch * spec.accumulate)
        batches = iter(loader)
        while step_in_epoch < steps_per_epoch and global_step < end:
            torch.manual_seed(_step_seed(spec.seed, global_step, world.rank))
            train_tf.generator.manual_seed(_step_seed(spec.seed + 1, global_step, world.rank))
            t0 = time.perf_counter()
            t_data = t_compute = 0.0
            for micro in range(spec.accumulate):
                ta = time.perf_counter()
                x, y = next(batches)
                if spec.model.channels_last and x.ndim == 4:
                    x = x.to(memory_format=torch.channels_last)
                cuda_sync()
                tb = time.perf_counter()
                last = micro == spec.accumulate - 1
                with (contextlib.nullcontext() if last else backend.no_sync(model, optimizer)):
                    with autocast:
                        out = model(x)
                        target = y if classify else y.float().reshape(out.shape)
                        loss = loss_fn(out.float(), target)
                    (loss / spec.accumulate).backward()
                cuda_sync()
                t_data += tb - ta
                t_compute += time.perf_counter() - tb
                # summed on the device and read at log time: no host sync per step on a GPU
                window["loss"] += loss.detach().double() * x.shape[0]
                if classify:
                    window["correct"] += (out.detach().argmax(1) == y).sum()
                window["count"] += x.shape[0]
            t1 = time.perf_counter()
            backend.sync_gradients(model, optimizer)
            cuda_sync()
            t2 = time.perf_counter()
            backend.step(optimizer)
            backend.zero_grad(optimizer)
            scheduler.step()
            cuda_sync()
            t3 = time.perf_counter()
            totals["data"] += t_data
            totals["compute"] += t_compute
            totals["sync"] += t2 - t1
            totals["optimizer"] += t3 - t2
            totals["steps"] += 1
            totals["samples"] += d.batch * spec.accumulate * world.size
            window["time"] += t3 - t0
            window["steps"] += 1
            step_in_epoch += 1
            global_step += 1

            if global_step % spec.log_every == 0 or step_in_epoch == steps_per_epoch or global_step == end:
                avg = backend.average({k: window[k] for k in ("loss", "correct", "count", "time")})
                rec = {"step": global_step, "epoch": epoch + step_in_epoch / steps_per_epoch,
                       "loss": avg["loss"] / avg["count"], "lr": optimizer.param_groups[0]["lr"],
                       "step_time": avg["time"] / window["steps"],
                       "samples_per_s": window["steps"] * d.batch * spec.accumulate * world.size / avg["time"]}
                if classify:
                    rec["accuracy"] = avg["correct"] / avg["count"]
                write(rec)
                progress.show(f"epoch {epoch + 1}/{epochs} step {step_in_epoch}/{steps_per_epoch} "
                              f"loss {rec['loss']:.4f}" + (f" acc {rec['accuracy']:.3f}" if classify else "")
                              + f" {rec['samples_per_s']:.0f} samples/s")
                window = {"loss": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0, "steps": 0}
            if spec.checkpoint.every_steps and global_step % spec.checkpoint.every_steps == 0:
                save_checkpoint()
        batches.close()
        if step_in_epoch == steps_per_epoch:
            last_eval = evaluate_and_log()
            epoch, step_in_epoch = epoch + 1, 0
            if spec.checkpoint.every_epochs and epoch % spec.checkpoint.every_epochs == 0:
                if not (spec.checkpoint.every_steps and global_step % spec.checkpoint.every_steps == 0):
                    save_checkpoint()
    if global_step == total_steps and step_in_epoch:  # a job of `steps` that ends mid-epoch
        last_eval = evaluate_and_log()
    wall = time.perf_counter() - t_run
    have_final = checkpoint.path_for(spec.checkpoint_dir, global_step).exists() if world.rank == 0 else None
    if world.size > 1:
        have_final = world.comm.bcast(have_final, root=0)
    if not have_final:
        save_checkpoint()  # the final state is always on disk

    steps = max(1, totals["steps"])
    timing = backend.average({k: totals[k] / steps for k in ("data", "compute", "sync", "optimizer")})
    summary = {
        "name": spec.name, "backend": backend.name, "model": spec.model.name, "precision": spec.precision,
        "world": {**world.as_dict(), "size": world.size}, "epochs": epoch, "global_step": global_step,
        "steps_this_run": totals["steps"], "resumed_from": resumed_from, "wall_seconds": wall,
        "samples_per_s": totals["samples"] / wall if wall > 0 else 0.0,
        "step_time_breakdown_s": timing, "final": last_eval,
        "target_accuracy": spec.target_accuracy,
        "reached_target": (last_eval.get("val_accuracy", 0) >= spec.target_accuracy) if spec.target_accuracy else None,
        "versions": _versions(), "fingerprint": fingerprint,
    }
    if world.rank == 0:
        metrics_file.close()
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / "summary.json")
        logger.info("done: %d steps in %.1f s, %.0f samples/s; %s", totals["steps"], wall, summary["samples_per_s"],
                    " ".join(f"{k} {v:.4f}" for k, v in last_eval.items()) or "no held-out split")
    model = net = optimizer = scheduler = None  # a DDP model must go before its process group (Gloo threads)
    gc.collect()
    backend.close()
    return summary
