"""Training throughput: a plain PyTorch loop vs mpidl with each backend, one run, same work.

    .venv/bin/python benchmarks/bench_train.py [--steps 600] [--log-every 50] [--repeats 5]

Same model (small CNN, width 32), batch (64 per rank), data (synthetic 16×16 RGB uint8
images) and optimizer (SGD + momentum) everywhere, one thread per rank:

  plain        the loop users write: batches drawn from the dataset held in memory as a
               tensor, forward, backward, step (no framework, no communication)
  mpidl/<b>    `mpidl train` with backend <b> reading the same data from HDF5, 1 rank
  mpidl/<b> ×2 the same under `mpirun -np 2` (aggregate samples/s; weak scaling)

Throughput is the median over log windows of `--log-every` steps after the first window
(warm-up), so evaluation and checkpoints are not counted; runs alternate so drift hits all.
"""
from __future__ import annotations

import argparse
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

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
           "OMP_NUM_THREADS": "1", "CI": "1"}
BATCH, SIZE, CLASSES, WIDTH = 64, 16, 10, 32


def plain(path: str, steps: int, log_every: int) -> list[float]:
    """The reference loop: returns samples/s per window of log_every steps."""
    import h5py
    import torch

    from mpidl.train.models import small_cnn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    with h5py.File(path, "r") as f:
        x_all, y_all = torch.from_numpy(f["x"][:]), torch.from_numpy(f["y"][:])
    model = small_cnn(3, CLASSES, WIDTH)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    rates, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y_all), (BATCH,), generator=g)
        x, y = x_all[idx].float().div_(255), y_all[idx]
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())
        if step % log_every == 0:
            now = time.perf_counter()
            rates.append(log_every * BATCH / (now - t0))
            t0 = now
    return rates


def mpidl_job(work: Path, backend: str, steps: int, log_every: int, data: str) -> Path:
    job = {
        "name": f"bench-{backend}", "seed": 0, "steps": steps, "backend": backend,
        "data": {"files": data, "batch": BATCH, "val_fraction": 0.0, "prefetch": 4},
        "model": {"name": "small_cnn", "args": {"width": WIDTH, "num_classes": CLASSES}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"scale_lr": False},
        "checkpoint": {"every_epochs": None, "dir": str(work / "ckpt")},
        "output": str(work / "run-{name}"), "log_every": log_every,
    }
    path = work / f"job-{backend}.json"
    path.write_text(json.dumps(job))  # YAML is a superset of JSON
    return path


def run_mpidl(job: Path, np_: int, log_every: int) -> list[float]:
    cmd = [sys.executable, "-m", "mpidl.cli", "train", str(job)]
    if np_ > 1:
        cmd = ["mpirun", "-np", str(np_), *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MPI_ENV}, timeout=1800,
                       cwd=HERE.parent)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    spec = json.loads(job.read_text())
    run_dir = Path(spec["output"].format(name=spec["name"]))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in recs if "samples_per_s" in r]


def steady(rates: list[float]) -> float:
    return float(np.median(rates[1:] if len(rates) > 2 else rates))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker-plain", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker_plain:
        print("RESULT " + json.dumps(plain(a.worker_plain, a.steps, a.log_every)), flush=True)
        return

    from common import write_result

    try:
        import horovod  # noqa: F401
        backends = ["horovod", "ddp", "mpi"]
    except ImportError:
        backends = ["ddp", "mpi"]
    work = Path(tempfile.mkdtemp(prefix="mpidl-bench-train-"))
    try:
        data = str(work / "images.h5")
        from mpidl.data.synth import synth_images

        synth_images(data, 20000, classes=CLASSES, channels=3, size=SIZE, noise=200)
        jobs = {b: mpidl_job(work, b, a.steps, a.log_every, data) for b in backends}
        runs: dict[str, list[float]] = {"plain": []}
        for b in backends:
            runs[f"{b}_1"], runs[f"{b}_2"] = [], []
        for rep in range(a.repeats):
            p = subprocess.run([sys.executable, __file__, "--worker-plain", data, "--steps", str(a.steps),
                                "--log-every", str(a.log_every)], capture_output=True, text=True,
                               env={**os.environ, **MPI_ENV}, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-3000:])
            runs["plain"].append(steady(json.loads(p.stdout.split("RESULT ", 1)[1])))
            for b in backends:
                runs[f"{b}_1"].append(steady(run_mpidl(jobs[b], 1, a.log_every)))
                runs[f"{b}_2"].append(steady(run_mpidl(jobs[b], 2, a.log_every)))
            print(f"repeat {rep + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), flush=True)

        med = {k: float(np.median(v)) for k, v in runs.items()}
        base = med["plain"]
        print(f"\n{'path':<22}{'samples/s':>12}{'x plain':>9}{'scaling 2 ranks':>17}")
        print(f"{'plain PyTorch, 1 rank':<22}{base:>12.0f}{1.0:>9.3f}")
        figures: dict = {"plain_samples_per_s": base, "backends": {}}
        for b in backends:
            one, two = med[f"{b}_1"], med[f"{b}_2"]
            figures["backends"][b] = {
                "samples_per_s_1_rank": one, "ratio_to_plain": one / base,
                "samples_per_s_2_ranks": two, "scaling_2_ranks": two / (2 * one),
                "ratio_2_ranks_to_plain": two / base, "runs_1_rank": runs[f"{b}_1"], "runs_2_ranks": runs[f"{b}_2"]}
            print(f"{'mpidl ' + b + ', 1 rank':<22}{one:>12.0f}{one / base:>9.3f}")
            print(f"{'mpidl ' + b + ', 2 ranks':<22}{two:>12.0f}{two / base:>9.3f}{two / (2 * one):>17.3f}")
        path = write_result("train", {
            "setup": {"model": f"small_cnn(width={WIDTH})", "batch_per_rank": BATCH, "image": f"3x{SIZE}x{SIZE} uint8",
                      "steps": a.steps, "log_every": a.log_every, "repeats": a.repeats, "threads_per_rank": 1,
                      "mpidl_path": "mpidl train (full trainer: HDF5 loader, backend, metrics)",
                      "plain_path": "in-memory tensor, random batches, no framework"},
            **figures, "plain_runs": runs["plain"], "goals": {"ratio_to_plain": 0.97},
        })
        print(f"wrote {path.relative_to(HERE.parent)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
