"""What `mpidl.Run` costs your own loop: the same loop with Horovod alone beside it, in one process.

    .venv/bin/python benchmarks/bench_own_loop.py            [--windows N] [--window-steps S] [--backend B]

Both sides are the loop of examples/mpidl_loop.py on a small CNN (width 32, batch 64, 16x16 RGB
images, SGD with momentum, one thread), each on its own copy of the same model and data:

  horovod alone   hvd.DistributedOptimizer and hvd.broadcast_parameters, batches from a ShardedLoader
                  iterated directly, the loss read each step (what a loop that logs does)
  mpidl.Run       the same model, optimizer and loader handed to mpidl.Run(backend="horovod"):
                  run.epochs() / run.batches(), optimizer.step() through the Run (sync and step
                  timed), run.log(loss=loss); its record every 20 steps

The data path is the same on both sides (one ShardedLoader each), so the difference is the Run
alone: its step bookkeeping, the preemption check, timing and records. One process alternates
windows of `--window-steps` steps of each side (processes on this VM run in different speed
modes; inside one process both sides share the mode); the table gives the median ratio of paired
windows with its 95% bootstrap interval. Checkpoints are off on both sides (they are per epoch,
not per step, and the Run's are written by rank 0 atomically as a loop's own would be).
Results: benchmarks/results/own-loop-<machine>.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import write_result  # noqa: E402


def median_ci(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median and its 95% bootstrap interval."""
    v = np.asarray(values)
    meds = np.median(np.random.default_rng(seed).choice(v, size=(2000, len(v)), replace=True), axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(np.median(v)), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=300, help="paired windows (after 4 warm-up pairs)")
    ap.add_argument("--window-steps", type=int, default=20)
    ap.add_argument("--backend", default="horovod", help="the Run's backend and the reference's (horovod)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch
    import horovod.torch as hvd

    import mpidl
    from mpidl.data import synth
    from mpidl.train.models import small_cnn

    torch.set_num_threads(1)
    world = mpidl.init()
    folder = Path(tempfile.mkdtemp(prefix="mpidl-own-loop-"))
    data = str(folder / "img.h5")
    synth.synth_images(data, 32000, classes=10, channels=3, size=16, seed=0, world=world)

    def loader():
        return mpidl.ShardedLoader(mpidl.H5Source(data), world, batch_size=64, seed=0,
                                   transform=lambda b: (b[0].float().div_(255), b[1]))

    torch.manual_seed(0)
    base = small_cnn(3, 10, 32)
    loss_fn = torch.nn.CrossEntropyLoss()

    # horovod alone
    hvd.init()
    ref_model = copy.deepcopy(base)
    ref_opt = hvd.DistributedOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9),
                                       named_parameters=ref_model.named_parameters())
    hvd.broadcast_parameters(ref_model.state_dict(), root_rank=0)
    ref_loader = loader()

    def reference():
        for epoch in range(1000):
            ref_loader.set_epoch(epoch)
            for x, y in ref_loader:
                loss = loss_fn(ref_model(x), y)
                ref_opt.zero_grad()
                loss.backward()
                ref_opt.step()
                float(loss.detach())
                yield

    # mpidl.Run
    run_model = copy.deepcopy(base)
    run = mpidl.Run(folder / "run", run_model, torch.optim.SGD(run_model.parameters(), lr=0.05, momentum=0.9),
                    loader(), epochs=1000, backend=args.backend, checkpoint_every_epochs=None, log_every=20)
    run_model, run_opt = run.model, run.optimizer

    def with_run():
        for epoch in run.epochs():
            for x, y in run.batches():
                loss = loss_fn(run_model(x), y)
                run_opt.zero_grad()
                loss.backward()
                run_opt.step()
                run.log(loss=loss)
                yield

    sides = {"horovod": reference(), "run": with_run()}
    times: dict[str, list[float]] = {k: [] for k in sides}
    clock = time.perf_counter
    for i in range(args.windows + 4):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in order:
            it = sides[name]
            t0 = clock()
            for _ in range(args.window_steps):
                next(it)
            if i >= 4:
                times[name].append((clock() - t0) / args.window_steps)
    ratios = [h / r for h, r in zip(times["horovod"], times["run"])]
    med, lo, hi = median_ci(ratios)
    step_ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print(f"{'side':<16}{'ms/step (median)':>18}")
    for k, v in step_ms.items():
        print(f"{k:<16}{v:>18.3f}")
    print(f"horovod / run per paired window: {med:.4f} [{lo:.4f}, {hi:.4f}] (1.0: the Run costs nothing; "
          f"goal >= 0.99)")
    figures = {"workload": "small_cnn width 32, batch 64, 16x16x3 uint8 from HDF5, SGD momentum, 1 thread",
               "backend": args.backend, "windows": args.windows, "window_steps": args.window_steps,
               "ms_per_step": step_ms, "ratio_horovod_over_run": {"median": med, "ci95": [lo, hi]},
               "goal": "ratio >= 0.99 (the Run costs at most 1%)", "met": lo >= 0.99 or med >= 0.99}
    if not args.no_write:
        print(f"wrote {write_result('own-loop', figures)}")
    os._exit(0)  # the Run and Horovod hold threads; the figures are written


if __name__ == "__main__":
    main()
