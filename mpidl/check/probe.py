"""What each rank of `mpidl check`'s runs reports: `mpidl train` itself, with one callback.

    mpirun -np N python -m mpidl.check.probe JOB.yaml --set ... [--resume]

runs `mpidl train`'s own command (its parser, its errors and exit codes: 2 for bad input, 3
after a preemption) with a `Probe` added, which writes `rank-<r>.jsonl` into $MPIDL_CHECK_DIR:
the rows this rank reads in each epoch of the run (the loader's own plan, mapped to rows of
the data file where the rows are staged), a hash of each parameter after every step, and at
the end its peak memory. With MPIDL_CHECK_SIGNAL_AT=k the last rank sends itself SIGUSR2
during step k + 1, as SLURM's warning signal arrives: in the middle of a step.

Your own loop on `mpidl.Run` (`mpidl check -- python train.py`) gets the same probe from the
Run itself when $MPIDL_CHECK_DIR is set (`from_env`): a Run and a Trainer offer it the same
attributes (world, position, steps_per_epoch, end, batch, batches_per_step, loader, net).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

import numpy as np
import torch

from mpidl.check import DIR_ENV, SIGNAL_ENV
from mpidl.train.callbacks import Callback


def parameter_hashes(net: torch.nn.Module) -> dict[str, str]:
    """name -> a hash of the parameter's bytes (any dtype)."""
    out = {}
    for name, p in net.named_parameters():
        raw = p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[name] = hashlib.blake2b(raw.tobytes(), digest_size=8).hexdigest()
    return out


def data_rows(loader, epoch: int) -> np.ndarray:
    """The rows of the data file(s) this rank's loader yields in `epoch`, in order."""
    rows = loader.plan(epoch).indices()
    if loader.staging is None:
        return rows
    # A staged share is the rank's rows of a fixed plan, copied range by range (staging.py).
    from mpidl.data.loader import _coalesce
    from mpidl.data.shard import plan_rank
    from mpidl.data.staging import STAGE_EPOCH

    src, w, st = loader.source, loader.world, loader.staging
    share = plan_rank(len(src), w.size, w.rank, st.batch, st.seed, STAGE_EPOCH, block=st.block, window=st.window,
                      drop_last=True, shuffle="block" if st.shuffle != "none" else "none")
    staged = np.concatenate([np.arange(a, b) for win in share.windows for a, b in _coalesce(win.ranges)])
    return staged[rows]


class Probe(Callback):
    def __init__(self, folder: Path, signal_at: Optional[int]):
        self.folder, self.signal_at = folder, signal_at
        self.out: Optional[TextIO] = None

    def _write(self, record: dict) -> None:
        assert self.out is not None  # opened by on_start
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def on_start(self, trainer) -> None:
        w = trainer.world
        self.folder.mkdir(parents=True, exist_ok=True)
        self.out = open(self.folder / f"rank-{w.rank}.jsonl", "w")
        pos, spe, end = trainer.position, trainer.steps_per_epoch, trainer.end
        per_step = (trainer.batch or 0) * trainer.batches_per_step
        self._write({"event": "start", "batch": trainer.batch, "steps_per_epoch": spe, "step": pos.global_step})
        step, epoch, first = pos.global_step, pos.epoch, pos.step_in_epoch
        while step < end and trainer.loader is not None:  # the epochs this run touches, and their steps
            n = min(spe - first, end - step)
            rows = data_rows(trainer.loader, epoch)[first * per_step:(first + n) * per_step]
            self._write({"event": "share", "epoch": epoch, "rows": sorted(int(r) for r in rows)})
            step, epoch, first = step + n, epoch + 1, 0

    def after_step(self, trainer) -> None:
        w, done = trainer.world, trainer.position.global_step  # steps before this one
        t0 = time.perf_counter()
        hashes = parameter_hashes(trainer.net)
        self._write({"event": "step", "step": done + 1, "params": hashes, "probe_s": time.perf_counter() - t0})
        if self.signal_at is not None and done == self.signal_at and w.rank == w.size - 1:
            os.kill(os.getpid(), signal.SIGUSR2)

    def on_end(self, trainer, summary: dict) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        cuda = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
        self._write({"event": "end", "step": trainer.position.global_step, "peak_rss_mib": peak,
                     "cuda_peak_mib": cuda})


def from_env() -> Optional[Probe]:
    """The probe `mpidl check` asks a run of your own loop for, or None outside a check."""
    if not os.environ.get(DIR_ENV):
        return None
    at = os.environ.get(SIGNAL_ENV)
    return Probe(Path(os.environ[DIR_ENV]), int(at) if at else None)


def main(argv: Optional[list[str]] = None) -> int:
    from mpidl import cli

    args = cli.build_parser().parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    args.callbacks = [from_env()]
    if argv is None:
        from mpidl import startup

        startup.claim()  # a process of its own, as `mpidl train`'s (cli.entry)
    return cli.dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
