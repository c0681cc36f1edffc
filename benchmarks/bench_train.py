"""Training throughput: a plain PyTorch loop vs mpidl with each backend, one run, same work.

    .venv/bin/python benchmarks/bench_train.py                      # small CNN on CPU
    .venv/bin/python benchmarks/bench_train.py --workload resnet50  # the GPU goal (on CUDA)
    options: [--steps N] [--log-every N] [--repeats N] [--backends horovod,ddp,mpi]
             [--model M --size S --batch B --rows R]  (override the workload, e.g. for a smoke run)

Workloads (same model, batch, optimizer and precision on both sides):

  small     small CNN (width 32), batch 64/rank, 16×16 RGB uint8, fp32, one thread per rank.
            plain: the dataset held in memory as a tensor, random batches gathered per step.
  resnet50  ResNet-50, batch 256/GPU, 224×224 RGB, bf16 autocast, channels_last, SGD+Nesterov.
            plain: one fixed batch of synthetic float tensors already on the device (no data
            path at all); mpidl reads uint8 images from HDF5 through its loader, so the ratio
            shows whether the data path costs the GPU anything.

  plain        the loop users write: forward, backward, step (no framework, no communication)
  mpidl/<b>    `mpidl train` with backend <b> reading the same data from HDF5, 1 rank
  mpidl/<b> ×2 the same under `mpirun -np 2` (aggregate samples/s; weak scaling), where there
               are two devices (CPU cores count as two)

Two measurements:

  in one process  per backend, one process alternates short windows of the plain step and of
                  mpidl's trainer step (`Trainer.steps()`) on copies of the same model: the
                  per-step difference is what mpidl adds (data hand-off, transform, metrics,
                  hooks, backend), resolved to well under 1% (medians with 95% bootstrap CIs
                  of the paired windows). Processes on a noisy VM run in different speed modes;
                  inside one process both sides share the mode.
  end to end      separate processes, as below; shows whole-run effects (start-up excluded)
                  but swings with each process's speed mode.

Throughput is the median over log windows of `--log-every` steps after the first window
(warm-up), so evaluation and checkpoints are not counted; runs alternate so drift hits all.
Results go to benchmarks/results/train-<machine>.json (resnet50: train-resnet50-<machine>.json).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mpidl.world import LOCAL_MPIRUN_ENV, OVERSUBSCRIBE_ENV  # noqa: E402

MPI_ENV = {**LOCAL_MPIRUN_ENV, **OVERSUBSCRIBE_ENV, "OMP_NUM_THREADS": "1", "CI": "1"}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    model: str
    model_args: dict
    batch: int
    size: int
    classes: int
    rows: int
    precision: str       # fp32 | bf16 (autocast)
    channels_last: bool
    plain_data: str      # "memory": batches gathered from the dataset tensor; "synthetic": one device tensor
    optimizer: dict
    threads: int         # torch threads per rank (0: torch's default)


WORKLOADS = {
    "small": Workload("small", "small_cnn", {"width": 32}, 64, 16, 10, 20000, "fp32", False, "memory",
                      {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}, 1),
    "resnet50": Workload("resnet50", "resnet50", {}, 256, 224, 100, 6400, "bf16", True, "synthetic",
                         {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5}, 0),
}


def plain_update(model, opt, loss_fn, x, y, autocast) -> None:
    """The step users write: forward, loss, backward, optimizer step."""
    with autocast:
        loss = loss_fn(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if x.device.type == "cpu":
        float(loss.detach())  # what a loop that logs does; on a GPU it would stall the queue


def plain(w: Workload, path: str, steps: int, log_every: int) -> list[float]:
    """The reference loop: returns samples/s per window of log_every steps."""
    import contextlib

    import h5py
    import torch

    from mpidl.train.models import build_model

    if w.threads:
        torch.set_num_threads(w.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(w.model, num_classes=w.classes, **w.model_args).to(device)
    fmt = torch.channels_last if w.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    o = w.optimizer
    opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"], nesterov=o.get("nesterov", False),
                          weight_decay=o["weight_decay"])
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if w.precision == "bf16"
                else contextlib.nullcontext())
    g = torch.Generator().manual_seed(0)
    if w.plain_data == "memory":
        with h5py.File(path, "r") as f:
            x_all, y_all = torch.from_numpy(f["x"][:]), torch.from_numpy(f["y"][:])
    else:
        x_fixed = torch.rand((w.batch, 3, w.size, w.size), generator=g).to(device).contiguous(memory_format=fmt)
        y_fixed = torch.randint(0, w.classes, (w.batch,), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = []
    sync()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if w.plain_data == "memory":
            idx = torch.randint(0, len(y_all), (w.batch,), generator=g)
            x, y = x_all[idx].to(device).float().div_(255).contiguous(memory_format=fmt), y_all[idx].to(device)
        else:
            x, y = x_fixed, y_fixed
        plain_update(model, opt, loss_fn, x, y, autocast)
        if step % log_every == 0:
            sync()
            now = time.perf_counter()
            rates.append(log_every * w.batch / (now - t0))
            t0 = now
    return rates


def mpidl_job(work: Path, w: Workload, backend: str, steps: int, log_every: int, data: str) -> Path:
    job = {
        "name": f"bench-{backend}", "seed": 0, "steps": steps, "backend": backend, "precision": w.precision,
        "data": {"files": data, "batch": w.batch, "val_fraction": 0.0, "prefetch": 4,
                 "preprocess": {"scale_uint8": True}},
        "model": {"name": w.model, "args": {**w.model_args, "num_classes": w.classes},
                  "channels_last": w.channels_last},
        "optimizer": w.optimizer,
        "schedule": {"scale_lr": False},
        "checkpoint": {"every_epochs": None, "dir": str(work / "ckpt")},
        "output": str(work / "run-{name}"), "log_every": log_every,
        "timing": "off",  # no device synchronisation per step: the plain loop has none either
    }
    path = work / f"job-{backend}.json"
    path.write_text(json.dumps(job))  # YAML is a superset of JSON
    return path


def run_mpidl(job: Path, np_: int, w: Workload) -> list[float]:
    cmd = [sys.executable, "-m", "mpidl.cli", "train", str(job), "--overwrite"]  # repeats reuse the folder
    if np_ > 1:
        cmd = ["mpirun", "-np", str(np_), *cmd]
    env = {**os.environ, **MPI_ENV}
    if not w.threads:
        env.pop("OMP_NUM_THREADS")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=HERE.parent)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    spec = json.loads(job.read_text())
    run_dir = Path(spec["output"].format(name=spec["name"]))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in recs if "samples_per_s" in r]


def inprocess(w: Workload, job: Path, windows: int, window_steps: int, resolve: float = 0.0) -> dict:
    """mpidl's trainer step and the plain step alternately in this one process, same model.

    The plain step is the end-to-end plain loop's: a uint8 batch gathered at random from the
    dataset held in memory (workload "memory"; "synthetic": one batch already on the device),
    scaled, forward, backward, SGD step, the loss read (as a loop that logs does). The mpidl
    step: one step of `Trainer.steps()` (loader hand-off, transform, objective, backend,
    schedule, metrics, preemption check).
    Both train copies of the same model with the same optimizer settings. Alternating short
    windows puts both in the same speed mode of the machine, so their difference per step is
    what mpidl adds. Windows go on in fifties until the ratio's 95% interval is within
    ±`resolve` (at least 100 windows), or `windows` have run.
    Each side's own time per step is also timed directly: the plain step's batch preparation,
    and mpidl's step less the trainer's forward/backward, sync and optimizer buckets.
    """
    import copy

    import h5py
    import torch

    from mpidl.spec import load_spec
    from mpidl.train.trainer import Trainer

    if w.threads:
        torch.set_num_threads(w.threads)
    trainer = Trainer(load_spec(job), overwrite=True)
    device = trainer.device
    net = copy.deepcopy(trainer.net)  # fresh parameters: no backend hooks on them
    o = w.optimizer
    opt = torch.optim.SGD(net.parameters(), lr=o["lr"], momentum=o["momentum"], nesterov=o.get("nesterov", False),
                          weight_decay=o["weight_decay"])
    loss_fn = torch.nn.CrossEntropyLoss()
    fmt = torch.channels_last if w.channels_last else torch.contiguous_format
    with h5py.File(json.loads(job.read_text())["data"]["files"], "r") as f:
        # the whole set only where batches are gathered from it
        rows = slice(None) if w.plain_data == "memory" else slice(w.batch)
        x_all, y_all = torch.from_numpy(f["x"][rows]), torch.from_numpy(f["y"][rows])
    g = torch.Generator().manual_seed(0)
    x_u8, y = x_all[: w.batch].to(device), y_all[: w.batch].to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if w.precision == "bf16"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    clock = time.perf_counter

    def plain_step() -> float:
        """One plain step; returns the time it spent outside forward, backward and optimizer."""
        t0 = clock()
        if w.plain_data == "memory":  # as the end-to-end plain loop: a random batch of the data in memory
            idx = torch.randint(0, len(y_all), (w.batch,), generator=g)
            x, t = x_all[idx].to(device), y_all[idx].to(device)
        else:  # one batch already on the device
            x, t = x_u8, y
        x = x.float().div_(255).contiguous(memory_format=fmt)
        own = clock() - t0
        plain_update(net, opt, loss_fn, x, t, autocast)
        return own

    def mpidl_step() -> float:
        next(steps)
        return 0.0

    # The trainer's own buckets of forward + backward, gradient sync and optimizer: what is left
    # of its step is mpidl's own time (data hand-off, transform, metrics, hooks, bookkeeping).
    # With the device's clock off (timing "off") buckets are host times: on CPU only.
    def core() -> float:
        return sum(trainer.totals[k] for k in ("compute", "sync", "optimizer"))

    steps = trainer.steps()
    plain_s, mpidl_s, plain_own, mpidl_own = [], [], [], []
    i = 0
    while True:
        done = len(plain_s)
        if done >= windows:
            break
        if resolve and done >= 100 and done % 50 == 0:
            lo, hi = median_ci([pl / mp for pl, mp in zip(plain_s, mpidl_s)])[1:]
            if (hi - lo) / 2 <= resolve:
                break
        sides = [("plain", plain_step), ("mpidl", mpidl_step)]
        for name, fn in (sides if i % 2 == 0 else sides[::-1]):
            sync()
            c0, own = core(), 0.0
            t0 = clock()
            for _ in range(window_steps):
                own += fn()
            sync()
            dt = clock() - t0
            if i >= 2:  # the first two pairs warm up
                if name == "plain":
                    plain_s.append(dt / window_steps)
                    plain_own.append(own / window_steps)
                else:
                    mpidl_s.append(dt / window_steps)
                    mpidl_own.append((dt - (core() - c0)) / window_steps)
        i += 1
    steps.close()
    n = max(1, trainer.totals["steps"])
    breakdown = {k: trainer.totals[k] / n for k in ("data", "compute", "sync", "optimizer")}
    trainer.close()
    res = {"plain_s": plain_s, "mpidl_s": mpidl_s, "breakdown_s": breakdown}
    if device.type == "cpu":
        res.update(plain_own_s=plain_own, mpidl_own_s=mpidl_own)
    return res


def median_ci(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median and its 95% bootstrap interval."""
    v = np.asarray(values)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(v, size=(2000, len(v)), replace=True), axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(np.median(v)), float(lo), float(hi)


def steady(rates: list[float]) -> float:
    return float(np.median(rates[1:] if len(rates) > 2 else rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    ap.add_argument("--steps", type=int, default=None, help="per run (default: small 600, resnet50 300)")
    ap.add_argument("--log-every", type=int, default=None, help="window (default: small 50, resnet50 20)")
    ap.add_argument("--repeats", type=int, default=5, help="end-to-end repeats (0: the in-process table only)")
    ap.add_argument("--backends", default=None, help="comma-separated (default: all that import)")
    for name in ("model", "size", "batch", "rows"):
        ap.add_argument(f"--{name}", type=str if name == "model" else int, default=None,
                        help="override the workload's (smoke runs)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--windows", type=int, default=1000, help="in-process alternating windows per backend, at most")
    ap.add_argument("--resolve", type=float, default=0.01,
                    help="stop adding windows once the ratio's 95%% interval is within ± this (0: run --windows)")
    ap.add_argument("--window-steps", type=int, default=5, help="steps per in-process window")
    ap.add_argument("--worker-inprocess", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-plain", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-workload", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker_inprocess:
        w = Workload(**json.loads(a.worker_workload))
        res = inprocess(w, Path(a.worker_inprocess), a.windows, a.window_steps, a.resolve)
        print("RESULT " + json.dumps(res), flush=True)
        return
    if a.worker_plain:
        w = Workload(**json.loads(a.worker_workload))
        print("RESULT " + json.dumps(plain(w, a.worker_plain, a.steps, a.log_every)), flush=True)
        return

    import torch

    from common import write_result

    w = WORKLOADS[a.workload]
    w = dataclasses.replace(w, **{k: getattr(a, k) for k in ("model", "size", "batch", "rows")
                                  if getattr(a, k) is not None})
    steps = a.steps or (300 if w.name == "resnet50" else 600)
    log_every = a.log_every or (20 if w.name == "resnet50" else 50)
    if a.backends:
        backends = a.backends.split(",")
    else:
        try:
            import horovod  # noqa: F401
            backends = ["horovod", "ddp", "mpi"]
        except ImportError:
            backends = ["ddp", "mpi"]
    cuda = torch.cuda.is_available()
    two_ranks = not cuda or torch.cuda.device_count() >= 2
    env = {**os.environ, **MPI_ENV}
    if not w.threads:
        env.pop("OMP_NUM_THREADS")
    work = Path(tempfile.mkdtemp(prefix="mpidl-bench-train-"))
    for b in backends:
        (work / f"inproc-{b}").mkdir()
    try:
        data = str(work / "images.h5")
        from mpidl.data.synth import synth_images

        synth_images(data, w.rows, classes=w.classes, channels=3, size=w.size, noise=200)
        jobs = {b: mpidl_job(work, w, b, steps, log_every, data) for b in backends}

        # 1. What mpidl adds per step, measured inside one process (immune to speed modes).
        inproc: dict = {}
        long_steps = (a.windows + 2) * a.window_steps + 10
        print(f"in one process, 1 rank, alternating windows of {a.window_steps} steps until the ratio's 95% interval "
              f"is within ±{a.resolve:g} (at most {a.windows}):")
        print(f"{'backend':<10}{'plain ms':>10}{'mpidl ms':>10}{'adds us/step':>14}{'x plain':>9}  95% CI")
        for b in backends:
            job = mpidl_job(work / f"inproc-{b}", w, b, long_steps, log_every, data)
            p = subprocess.run([sys.executable, __file__, "--worker-inprocess", str(job), "--worker-workload",
                                json.dumps(dataclasses.asdict(w)), "--windows", str(a.windows), "--window-steps",
                                str(a.window_steps), "--resolve", str(a.resolve)],
                               capture_output=True, text=True, env=env, timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-3000:])
            res = json.loads(p.stdout.split("RESULT ", 1)[1])
            ratio, lo, hi = median_ci([pl / mp for pl, mp in zip(res["plain_s"], res["mpidl_s"])])
            adds, adds_lo, adds_hi = median_ci([mp - pl for pl, mp in zip(res["plain_s"], res["mpidl_s"])])
            pl_ms, mp_ms = 1e3 * float(np.median(res["plain_s"])), 1e3 * float(np.median(res["mpidl_s"]))
            inproc[b] = {"plain_step_s_median": pl_ms / 1e3, "mpidl_step_s_median": mp_ms / 1e3,
                         "windows": len(res["plain_s"]), "ratio_to_plain": ratio, "ratio_ci95": [lo, hi],
                         "mpidl_adds_us_per_step": adds * 1e6, "mpidl_adds_us_ci95": [adds_lo * 1e6, adds_hi * 1e6],
                         **res}
            if "mpidl_own_s" in res:
                own = median_ci([m - p_ for p_, m in zip(res["plain_own_s"], res["mpidl_own_s"])])
                inproc[b].update(plain_own_us_median=1e6 * float(np.median(res["plain_own_s"])),
                                 mpidl_own_us_median=1e6 * float(np.median(res["mpidl_own_s"])),
                                 own_difference_us=own[0] * 1e6, own_difference_us_ci95=[own[1] * 1e6, own[2] * 1e6])
            print(f"{b:<10}{pl_ms:>10.2f}{mp_ms:>10.2f}{adds * 1e6:>14.0f}{ratio:>9.3f}  [{lo:.3f}, {hi:.3f}]",
                  flush=True)
        owns = {b: v for b, v in inproc.items() if "mpidl_own_us_median" in v}
        if owns:
            print("\nown time per step outside forward, backward and optimizer (us), same windows:")
            print(f"{'backend':<10}{'windows':>8}{'plain':>8}{'mpidl':>8}{'mpidl - plain':>15}  95% CI{'':>9}"
                  f"{'% of step':>9}")
            for b, v in owns.items():
                lo_, hi_ = v["own_difference_us_ci95"]
                print(f"{b:<10}{v['windows']:>8}{v['plain_own_us_median']:>8.0f}{v['mpidl_own_us_median']:>8.0f}"
                      f"{v['own_difference_us']:>15.0f}  [{lo_:.0f}, {hi_:.0f}]"
                      f"{100 * v['own_difference_us'] / (v['plain_step_s_median'] * 1e6):>12.2f}")

        if a.repeats == 0:  # the in-process table only
            return
        # 2. End to end, separate processes: the whole `mpidl train` against the plain loop.
        runs: dict[str, list[float]] = {"plain": []}
        for b in backends:
            runs[f"{b}_1"] = []
            if two_ranks:
                runs[f"{b}_2"] = []
        for rep in range(a.repeats):
            p = subprocess.run([sys.executable, __file__, "--worker-plain", data, "--worker-workload",
                                json.dumps(dataclasses.asdict(w)), "--steps", str(steps), "--log-every",
                                str(log_every)], capture_output=True, text=True, env=env, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-3000:])
            runs["plain"].append(steady(json.loads(p.stdout.split("RESULT ", 1)[1])))
            for b in backends:
                runs[f"{b}_1"].append(steady(run_mpidl(jobs[b], 1, w)))
                if two_ranks:
                    runs[f"{b}_2"].append(steady(run_mpidl(jobs[b], 2, w)))
            print(f"repeat {rep + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), flush=True)

        med = {k: float(np.median(v)) for k, v in runs.items()}
        base = med["plain"]
        print(f"\n{'path':<22}{'samples/s':>12}{'x plain':>9}{'scaling 2 ranks':>17}{'paired':>9}  IQR")
        print(f"{'plain PyTorch, 1 rank':<22}{base:>12.0f}{1.0:>9.3f}")
        figures: dict = {"plain_samples_per_s": base, "backends": {}, "inprocess": inproc}
        for b in backends:
            one = med[f"{b}_1"]
            # Each repeat's run against the plain run beside it: drift cancels, per-process noise stays.
            paired = [m / p_ for m, p_ in zip(runs[f"{b}_1"], runs["plain"])]
            q1, q3 = np.percentile(paired, [25, 75])
            fig = {"samples_per_s_1_rank": one, "ratio_to_plain": one / base, "runs_1_rank": runs[f"{b}_1"],
                   "paired_ratio_median": float(np.median(paired)), "paired_ratio_iqr": [float(q1), float(q3)]}
            print(f"{'mpidl ' + b + ', 1 rank':<22}{one:>12.0f}{one / base:>9.3f}{'':>17}"
                  f"{np.median(paired):>9.3f}  [{q1:.2f}, {q3:.2f}]")
            if two_ranks:
                two = med[f"{b}_2"]
                fig.update({"samples_per_s_2_ranks": two, "scaling_2_ranks": two / (2 * one),
                            "ratio_2_ranks_to_plain": two / base, "runs_2_ranks": runs[f"{b}_2"]})
                print(f"{'mpidl ' + b + ', 2 ranks':<22}{two:>12.0f}{two / base:>9.3f}{two / (2 * one):>17.3f}")
            figures["backends"][b] = fig
        if a.no_write:
            return
        goal = 0.95 if w.name == "resnet50" else 0.97
        setup = {"workload": w.name, "model": w.model, "model_args": w.model_args, "batch_per_rank": w.batch,
                 "image": f"3x{w.size}x{w.size} uint8", "rows": w.rows, "precision": w.precision,
                 "channels_last": w.channels_last, "steps": steps, "log_every": log_every, "repeats": a.repeats,
                 "threads_per_rank": w.threads or "torch default",
                 "mpidl_path": "mpidl train (full trainer: HDF5 loader, backend, metrics), timing off",
                 "plain_path": ("one synthetic float batch on the device, no data path" if w.plain_data == "synthetic"
                                else "in-memory tensor, random batches, no framework")}
        path = write_result("train" if w.name == "small" else f"train-{w.name}", {
            "setup": setup, **figures, "plain_runs": runs["plain"], "goals": {"ratio_to_plain": goal}})
        print(f"wrote {path.relative_to(HERE.parent)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
