"""Where the Horovod backend's time goes on CPU ranks, and what mpidl sets about it.

    .venv/bin/python benchmarks/bench_horovod_cpu.py [--ranks 2] [--repeats 5] [--steps 300]
                                                     [--variants NAME,...] [--batch 64] [--timeline]
                                                     [--controllers] [--no-write]

The demo job (small CNN, batch 64 a rank, one thread a rank) on `--ranks` ranks under mpirun,
each variant a separate `mpidl train` run; variants alternate, repeat by repeat (the order turns
each time), so drift hits them alike. A variant is a backend and environment:

  horovod-spin     Horovod with Open MPI busy-polling (OMPI_MCA_mpi_yield_when_idle=0): as before
  horovod          Horovod as mpidl now runs it (yield_when_idle=1, set by mpidl.init)
  horovod-cycle5   ... with HOROVOD_CYCLE_TIME=5 (ms between the background thread's cycles)
  horovod-nocache  ... with HOROVOD_CACHE_CAPACITY=0 (no response cache: negotiate every tensor)
  horovod-nofuse   ... with HOROVOD_FUSION_THRESHOLD=0 (no fusion buffer)
  horovod-affinity ... with HOROVOD_THREAD_AFFINITY pinning the background thread to its rank's core
  horovod-cycle0.2 ... with HOROVOD_CYCLE_TIME=0.2
  horovod-spinwait ... with Horovod's own spinning wait for the allreduces (MPIDL_HOROVOD_WAIT=spin)
  horovod-threads2 ... with 2 torch threads a rank (OMP_NUM_THREADS=2) instead of 1
  horovod-nocache-spinwait  both
  mpi-spin, mpi    the mpi backend, busy-polling and yielding
  ddp-spin, ddp    DDP (Gloo), the same two
  none-spin, none  the no-communication baseline, the same two

Per run: samples/s and the step's split (data, compute, sync, optimizer) as medians over the
log windows after the first `--warmup` steps, and each rank's CPU time by thread over the
measured steps (from /proc/self/task at the end of the warm-up and before the backend is
released): the training thread (the main one) and the rest (Horovod's background thread, the
loader's reader, Gloo's threads), in CPU ms per step. Per variant: the
median over repeats and its range; X/X0 is samples/s over the baseline of the same wait mode.

--batch B: B samples a rank a step (default the demo's 64): a longer step shows which of Horovod's
costs are fixed per step (they shrink as a share of it).

--controllers: instead of the variants, Horovod's MPI controller (under mpirun) against its Gloo
controller (under `horovodrun --gloo`, TCP) and no communication, on a bare loop of the demo's
model (no mpidl around it: `mpidl train` launches under mpirun only), interleaved the same way.

--timeline: one more run of `horovod-spin` and `horovod` with HOROVOD_TIMELINE, summarised per
activity (time per step in NEGOTIATE_ALLREDUCE, ALLREDUCE, MPI_ALLREDUCE, the fusion copies).
Results: benchmarks/results/horovod-cpu-<ranks>ranks[-b<batch>|-controllers]-<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from mpidl.world import LOCAL_MPIRUN_ENV, MPI_DEFAULTS  # noqa: E402

from common import write_result  # noqa: E402

MPI_ENV = {**LOCAL_MPIRUN_ENV, "OMP_NUM_THREADS": "1", "CI": "1", "MPIDL_PROGRESS": "lines", "PYTHONUNBUFFERED": "1"}
SPIN = {"OMPI_MCA_mpi_yield_when_idle": "0"}
VARIANTS = {
    "horovod-spin": ("horovod", SPIN),
    "horovod": ("horovod", {}),
    "horovod-cycle5": ("horovod", {"HOROVOD_CYCLE_TIME": "5"}),
    "horovod-nocache": ("horovod", {"HOROVOD_CACHE_CAPACITY": "0"}),
    "horovod-nofuse": ("horovod", {"HOROVOD_FUSION_THRESHOLD": "0"}),
    "horovod-affinity": ("horovod", {"HOROVOD_THREAD_AFFINITY": "AFFINITY"}),
    "horovod-cycle0.2": ("horovod", {"HOROVOD_CYCLE_TIME": "0.2"}),
    "horovod-spinwait": ("horovod", {"MPIDL_HOROVOD_WAIT": "spin"}),
    "horovod-threads2": ("horovod", {"OMP_NUM_THREADS": "2"}),
    "horovod-nocache-spinwait": ("horovod", {"HOROVOD_CACHE_CAPACITY": "0", "MPIDL_HOROVOD_WAIT": "spin"}),
    "mpi-spin": ("mpi", SPIN), "mpi": ("mpi", {}),
    "ddp-spin": ("ddp", SPIN), "ddp": ("ddp", {}),
    "none-spin": ("none", SPIN), "none": ("none", {}),
}
BUCKETS = ("data", "compute", "sync", "optimizer")

# Runs the trainer as `mpidl train` does, and writes this rank's CPU time per thread twice: at the
# end of the warm-up and before the trainer releases the backend (Horovod's thread still lives).
RANK = r'''
import json, os, sys
from mpidl.train import trainer

def threads():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        stat = open(f"/proc/self/task/{tid}/stat").read()
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (int(tid) == os.getpid(), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out

marks = {}
done = trainer.Trainer.step_done
def step_done(self, times):
    done(self, times)
    if self.position.global_step == int(os.environ["BENCH_WARMUP"]):
        marks["warm"] = threads()
close = trainer.Trainer.close
def closing(self):
    marks["end"] = threads()
    rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
    with open(os.path.join(os.environ["BENCH_OUT"], f"threads-{rank}.json"), "w") as f:
        json.dump(marks, f)
    close(self)
trainer.Trainer.step_done, trainer.Trainer.close = step_done, closing
from mpidl.cli import main
sys.exit(main(sys.argv[1:]))
'''


def affinity_value(ranks: int) -> str:
    """HOROVOD_THREAD_AFFINITY: each rank's background thread on the core its rank would use."""
    return ",".join(str(r % (os.cpu_count() or 1)) for r in range(ranks))


# The controllers' loop: the demo's model and step, bare, with each thread's CPU time over the measured steps.
LOOP = r'''
import json, os, sys, time
import torch
from mpidl.train.models import small_cnn
torch.set_num_threads(1)
mode, steps, warmup, batch = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
model = small_cnn(3, 10, 32)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
rank, size = int(os.environ.get("OMPI_COMM_WORLD_RANK", 0)), int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))
if mode != "none":
    import horovod.torch as hvd
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), 0)
x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))
def cpu():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        f = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        out[tid] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out
for i in range(steps):
    if i == warmup:
        t0, c0 = time.perf_counter(), cpu()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
dt, c1, n, main = time.perf_counter() - t0, cpu(), steps - warmup, str(os.getpid())
if rank == 0:
    rest = sum(c1[t] - c0.get(t, 0.0) for t in c1 if t != main)
    print("RESULT " + json.dumps({"samples_per_s": size * batch * n / dt, "ms_per_step": 1e3 * dt / n,
                                  "cpu_main_ms_per_step": 1e3 * (c1[main] - c0[main]) / n,
                                  "cpu_other_threads_ms_per_step": 1e3 * rest / n}))
'''
CONTROLLERS = ("mpi", "gloo", "none")


def controller_run(mode: str, ranks: int, steps: int, warmup: int, batch: int) -> dict:
    args = [sys.executable, "-c", LOOP, mode, str(steps), str(warmup), str(batch)]
    if mode == "gloo":  # Horovod's own launcher: the Gloo rendezvous needs it
        cmd = [str(Path(sys.executable).with_name("horovodrun")), "--gloo", "-np", str(ranks), "-H",
               f"localhost:{ranks}", *args]
    else:
        cmd = ["mpirun", "-np", str(ranks), "--bind-to", "core", *args]
    env = {**os.environ, **MPI_ENV, **MPI_DEFAULTS}  # as mpidl.init() sets it: no mpidl in this loop
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in p.stdout.splitlines() if "RESULT " in ln), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{mode}: exit {p.returncode}: {(p.stdout + p.stderr)[-2000:]}")
    return json.loads(line.split("RESULT ", 1)[1])


def interleaved(names: list[str], repeats: int, run) -> dict[str, list[dict]]:
    """run(name) for each name, `repeats` times; the order turns each repeat and reverses every
    other one, so drift hits every name alike."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(repeats):
        k = rep % len(names)
        order = names[k:] + names[:k]
        for name in (order if rep % 2 == 0 else order[::-1]):
            runs[name].append(run(name))
            print(f"rep {rep + 1}/{repeats} {name}: {runs[name][-1]['samples_per_s']:,.0f} samples/s", flush=True)
    return runs


def controllers(args) -> None:
    runs = interleaved(list(CONTROLLERS), args.repeats,
                       lambda mode: controller_run(mode, args.ranks, args.steps, args.warmup, args.batch))
    table = {m: {"samples_per_s": spread([r["samples_per_s"] for r in rs]),
                 **{k: statistics.median(r[k] for r in rs)
                    for k in ("ms_per_step", "cpu_main_ms_per_step", "cpu_other_threads_ms_per_step")}}
             for m, rs in runs.items()}
    base = table["none"]["samples_per_s"]["median"]
    print(f"{'controller':<12}{'samples/s':>10} {'(min-max)':<16}{'X/X0':>6}{'ms/step':>9}{'cpu main':>10}"
          f"{'cpu other':>10}  ({args.ranks} ranks, batch {args.batch} a rank, {args.repeats} repeats)")
    for m, row in table.items():
        s = row["samples_per_s"]
        row["x_over_x0"] = s["median"] / base
        print(f"{m:<12}{s['median']:>10,.0f} ({s['min']:,.0f}-{s['max']:,.0f}){'':<3}{row['x_over_x0']:>6.2f}"
              f"{row['ms_per_step']:>9.1f}{row['cpu_main_ms_per_step']:>10.1f}{row['cpu_other_threads_ms_per_step']:>10.1f}")
    if not args.no_write:
        path = write_result(f"horovod-cpu-{args.ranks}ranks-controllers", {
            "ranks": args.ranks, "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
            "batch": args.batch, "loop": "bare loop of the demo's small CNN, hvd.DistributedOptimizer",
            "launch": {"mpi": "mpirun (MPI controller, OMPI_MCA_mpi_yield_when_idle as mpidl sets it)",
                       "gloo": "horovodrun --gloo (Gloo controller and CPU operations)", "none": "mpirun, no Horovod"},
            "table": table, "runs": runs})
        print(f"wrote {path}")


def one_run(variant: str, ranks: int, steps: int, data: str, folder: Path, warmup: int,
            timeline: bool = False, batch: int = 64) -> dict:
    backend, extra = VARIANTS[variant]
    out = folder / variant
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MPI_ENV, **extra, "BENCH_OUT": str(out), "BENCH_WARMUP": str(warmup)}
    if env.get("HOROVOD_THREAD_AFFINITY") == "AFFINITY":
        env["HOROVOD_THREAD_AFFINITY"] = affinity_value(ranks)
    if timeline:
        env["HOROVOD_TIMELINE"] = str(out / "timeline.json")
    sets = [f"backend={backend}", f"steps={steps}", "epochs=null", "log_every=10", f"data.files={data}",
            f"output={out / 'run'}", "checkpoint.every_epochs=null", "data.val_fraction=0", "data.synth.rows=24000",
            f"data.batch={batch}"]
    cmd = ["mpirun", "-np", str(ranks), "--bind-to", "core", sys.executable, "-c", RANK, "train",
           str(HERE.parent / "jobs" / "demo.yaml"), "--overwrite", *[x for s in sets for x in ("--set", s)]]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if p.returncode:
        raise RuntimeError(f"{variant}: exit {p.returncode}: {(p.stdout + p.stderr)[-2000:]}")
    return {"run": out / "run", "threads": [json.loads((out / f"threads-{r}.json").read_text()) for r in range(ranks)],
            "timeline": out / "timeline.json" if timeline else None}


def figures(res: dict, warmup: int, steps: int) -> dict:
    recs = [json.loads(x) for x in (res["run"] / "metrics.jsonl").read_text().splitlines()]
    wins = [r for r in recs if "step_time" in r and r["step"] > warmup]
    def delta(marks: dict, main: bool) -> float:  # CPU seconds of the measured steps, threads alive at both marks
        return sum(cpu - marks["warm"][tid][1] for tid, (is_main, cpu) in marks["end"].items()
                   if is_main == main and tid in marks["warm"])

    measured = steps - warmup
    cpu_main = statistics.mean(delta(m, True) for m in res["threads"]) / measured
    cpu_rest = statistics.mean(delta(m, False) for m in res["threads"]) / measured
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in wins),
            "time": {k: statistics.median(r["time"][k] for r in wins) for k in BUCKETS},
            "cpu_main_ms_per_step": 1e3 * cpu_main, "cpu_other_threads_ms_per_step": 1e3 * cpu_rest}


def timeline_summary(path: Path, steps: int) -> dict:
    """Per activity, the ms per step the background thread spent in it (summed over tensors)."""
    text = path.read_text().strip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    open_: dict = {}
    total: dict[str, float] = {}
    for e in events:
        key = (e.get("pid"), e.get("tid"), e.get("name"))
        if e.get("ph") == "B":
            open_.setdefault((e.get("pid"), e.get("tid")), []).append((e.get("name"), e["ts"]))
        elif e.get("ph") == "E":
            stack = open_.get((e.get("pid"), e.get("tid")))
            if stack:
                name, ts = stack.pop()
                total[name] = total.get(name, 0.0) + (e["ts"] - ts) / 1e3
        del key
    return {k: v / steps for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--controllers", action="store_true")
    ap.add_argument("--tag", default="", help="appended to the result's name (a subset of the variants)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.controllers:
        return controllers(args)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]} (choose from {', '.join(VARIANTS)})")

    folder = Path(tempfile.mkdtemp(prefix="mpidl-hvd-cpu-"))
    data = str(folder / "demo.h5")
    runs = interleaved(names, args.repeats, lambda name: figures(
        one_run(name, args.ranks, args.steps, data, folder, args.warmup, batch=args.batch), args.warmup, args.steps))

    table = {}
    for name in names:
        rs = runs[name]
        table[name] = {"samples_per_s": spread([r["samples_per_s"] for r in rs]),
                       "time_ms": {k: 1e3 * statistics.median(r["time"][k] for r in rs) for k in BUCKETS},
                       "cpu_main_ms_per_step": statistics.median(r["cpu_main_ms_per_step"] for r in rs),
                       "cpu_other_threads_ms_per_step": statistics.median(r["cpu_other_threads_ms_per_step"] for r in rs)}
    for name in names:  # X / X0: against the baseline of the same wait mode
        base = "none-spin" if name.endswith("-spin") else "none"
        if base in table:
            table[name]["x_over_x0"] = table[name]["samples_per_s"]["median"] / table[base]["samples_per_s"]["median"]

    head = (f"{'variant':<18}{'samples/s':>10} {'(min-max)':<16}{'X/X0':>6}{'compute':>9}{'sync':>7}{'opt':>6}"
            f"{'data':>6}{'cpu main':>10}{'cpu other':>10}  (ms a step; {args.ranks} ranks, {args.repeats} repeats)")
    print(head)
    for name, row in table.items():
        s, t = row["samples_per_s"], row["time_ms"]
        print(f"{name:<18}{s['median']:>10,.0f} ({s['min']:,.0f}-{s['max']:,.0f}){'':<3}"
              f"{row.get('x_over_x0', float('nan')):>6.2f}{t['compute']:>9.1f}{t['sync']:>7.1f}{t['optimizer']:>6.1f}"
              f"{t['data']:>6.1f}{row['cpu_main_ms_per_step']:>10.1f}{row['cpu_other_threads_ms_per_step']:>10.1f}")

    timelines = {}
    if args.timeline:
        for name in ("horovod-spin", "horovod"):
            res = one_run(name, args.ranks, args.steps, data, folder, args.warmup, timeline=True, batch=args.batch)
            timelines[name] = timeline_summary(res["timeline"], args.steps)
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(timelines[name].items())[:6])
            print(f"timeline {name} (ms a step): {top}")

    if not args.no_write:
        name = f"horovod-cpu-{args.ranks}ranks" + (f"-b{args.batch}" if args.batch != 64 else "") + \
            (f"-{args.tag}" if args.tag else "")
        path = write_result(name, {"ranks": args.ranks, "batch": args.batch, "repeats": args.repeats, "steps": args.steps,
                                            "warmup": args.warmup, "job": f"jobs/demo.yaml (small CNN, batch {args.batch} a rank)",
                                            "variants": {n: {"backend": VARIANTS[n][0], "env": VARIANTS[n][1]}
                                                         for n in names},
                                            "table": table, "runs": runs, "timelines": timelines})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
