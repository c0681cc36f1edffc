"""How soon a lost node or a stuck rank ends a job, on two emulated nodes (slurm/cluster.sh start --nodes 2; root).

For each case, the demo job (shrunk) trains on 2 nodes × 2 ranks with the default settings; once a
few metrics records are written, node2's ranks are killed ("kill"), node2's link is taken down
("link down"), or the last rank's training thread hangs while its process lives on ("stuck": only
the backend's own timeout can notice). The seconds from the fault until the launcher returns are
measured, with the first line that names the loss. A case still running after --limit seconds
counts as a hang (and is killed). Writes benchmarks/results/faults-<machine>.json.

    .venv/bin/python benchmarks/bench_faults.py [--repeats 1] [--limit 120] [--faults kill,stuck]
        [--launchers mpirun,"srun -K"] [--backends mpi,ddp,horovod]
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write_result

sys.path.insert(0, str(REPO))
from mpidl.world import LOCAL_MPIRUN_ENV, OVERSUBSCRIBE_ENV
from mpidl import net
from mpidl.spec import DDPSpec

CLUSTER = str(REPO / "slurm" / "cluster.sh")
PYTHON = str(REPO / ".venv" / "bin" / "python")
DEMO = ["data.synth.rows=4000", "data.synth.size=8", "data.synth.noise=100", "model.args.width=16",
        "data.batch=32", "epochs=200", "log_every=2"]
LAUNCHERS = ("mpirun", "srun -K")
BACKENDS = ("mpi", "ddp", "horovod")
FAULTS = ("kill", "link down", "stuck")
CASES = [(launcher, backend, fault) for fault in FAULTS for launcher in LAUNCHERS for backend in BACKENDS
         if fault != "stuck" or launcher == "srun -K"]  # a stuck rank is the backend's business, not the launcher's
# The first stderr line that names the loss: the launcher's, Horovod's stall report, Gloo's timeout.
NAMING = re.compile(r"srun: error: (node2|Node failure).*|mpirun noticed that process rank .*|"
                    r"Remote daemon.*on node node2.*|Missing ranks:\n.*|.*Timed out waiting \d+ms.*")
# The training, as a script: the last rank's training thread hangs at its 7th forward (stuck).
TRAIN = """
import sys, time, mpidl
from pathlib import Path
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

w = mpidl.init()
fault, job, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
out = Path(next(s for s in sets if s.startswith("output=")).split("=", 1)[1])

class Stuck(Callback):
    def on_start(self, trainer):
        calls = [0]
        def hook(module, args):
            calls[0] += 1
            if w.rank == w.size - 1 and calls[0] == 7:
                (out.parent / (out.name + ".stuck")).touch()
                time.sleep(3600)
        trainer.net.register_forward_pre_hook(hook)

train(load_spec(job, sets), callbacks=[Stuck()] if fault == "stuck" else [])
"""


def horovod_stall_defaults() -> dict | None:
    try:
        from mpidl.train.backends.horovod import STALL_DEFAULTS
    except ImportError:
        return None
    return STALL_DEFAULTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def in_netns(ns: str, marker: str) -> list[int]:
    ino = os.stat(f"/run/netns/{ns}").st_ino
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == ino and marker in Path(f"/proc/{pid}/cmdline").read_text():
                found.append(int(pid))
        except OSError:
            pass
    return found


def wait_node2_idle(env: dict) -> None:
    """After a link went down: node2 back in service (SLURM may have marked it down meanwhile)."""
    for _ in range(240):
        st = subprocess.run(["sinfo", "-h", "-n", "node2", "-o", "%T"], capture_output=True, text=True,
                            env=env).stdout.strip()
        if st == "idle":
            return
        if st.startswith("down"):
            subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], env=env)
        time.sleep(0.5)


def one(env: dict, made: list[list[str]], launcher: str, backend: str, fault: str, limit: float, work: Path) -> dict:
    out = work / f"{launcher.split()[0]}-{backend}-{fault.replace(' ', '')}-{time.monotonic_ns()}"
    sets = [f"backend={backend}", f"data.files={work / 'demo.h5'}", f"output={out}", *DEMO]
    train = [PYTHON, "-c", TRAIN, fault, str(REPO / "jobs" / "demo.yaml"), *sets]
    if launcher == "mpirun":
        cmd = ["mpirun", "-H", "node1:2,node2:2", "-np", "4", "--mca", "plm_rsh_agent", f"{CLUSTER} exec", *train]
    else:
        cmd = ["srun", "-K", "-N", "2", "--ntasks-per-node=2", "--mpi=pmix", *train]
    with open(f"{out}.stderr", "w+") as err:  # a file: a full pipe would stall the job
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env, cwd=REPO)
        metrics, stuck = out / "metrics.jsonl", out.parent / (out.name + ".stuck")
        nodes = {n: next(w for k, w in made if k == "netns" and w.endswith("-" + n)) for n in ("node1", "node2")}
        link = next(what for kind, what in made if kind == "link" and what.endswith("v2"))
        while p.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.2)
        if p.poll() is not None:  # not a measurement: say why
            err.seek(0)
            last = [ln for ln in err.read().splitlines() if ln.strip() and "socket.cpp" not in ln][-3:]
            return {"launcher": launcher, "backend": backend, "fault": fault, "seconds": None, "exit": p.returncode,
                    "line": "ended before the fault: " + " | ".join(last)[:300]}
        if fault == "kill":
            for pid in in_netns(nodes["node2"], str(out)):
                os.kill(pid, signal.SIGKILL)
        elif fault == "link down":
            subprocess.run(["ip", "link", "set", link, "down"], check=True)
        else:
            while p.poll() is None and not stuck.exists():
                time.sleep(0.05)
        t0 = time.monotonic()
        try:
            p.wait(timeout=limit)
            seconds: float | None = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            seconds = None
        for pid in in_netns(nodes["node2"], str(out)) + in_netns(nodes["node1"], str(out)):
            os.kill(pid, signal.SIGKILL)
        if fault == "link down":
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
            wait_node2_idle(env)
        err.seek(0)
        found = NAMING.search(err.read())
    return {"launcher": launcher, "backend": backend, "fault": fault, "seconds": seconds,
            "exit": p.returncode, "line": found.group(0).replace("\n", " ").strip()[:200] if found else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--limit", type=float, default=120, help="seconds after the fault that count as a hang")
    ap.add_argument("--faults", default=",".join(FAULTS), help="of %(default)s")
    ap.add_argument("--launchers", default=",".join(LAUNCHERS), help="of %(default)s")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="of %(default)s")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_faults: needs root (emulated nodes)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mpidl-faults-") as tmp:
        work = Path(tmp)
        state = work / "cluster"
        env = {**os.environ, "MPIDL_SLURM_DIR": str(state), "MPIDL_SLURMCTLD_PORT": str(free_port()),
               "MPIDL_SLURMD_PORT": str(free_port()), "SLURM_CONF": str(state / "slurm.conf"),
               **LOCAL_MPIRUN_ENV, **OVERSUBSCRIBE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.update(net.launcher_env(env))
        subprocess.run(["bash", CLUSTER, "start", "--nodes", "2"], env=env, check=True)
        try:
            slurmd_timeout = next(int(line.split("=")[1]) for line in (state / "slurm.conf").read_text().splitlines()
                                  if line.startswith("SlurmdTimeout="))
            made = [line.split(" ", 1) for line in (state / "made").read_text().splitlines()]
            chosen = [c for c in CASES if c[0] in args.launchers.split(",") and c[1] in args.backends.split(",")
                      and c[2] in args.faults.split(",")]
            runs = [one(env, made, *case, args.limit, work) for _ in range(args.repeats) for case in chosen]
        finally:
            subprocess.run(["bash", CLUSTER, "stop"], env=env)
    print(f"{'launcher':9} {'backend':8} {'fault':10} {'seconds':>8} {'exit':>5}  line naming the loss")
    for r in runs:
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "HANG"
        print(f"{r['launcher']:9} {r['backend']:8} {r['fault']:10} {secs:>8} {r['exit']:>5}  {r['line'][:90]}")
    path = write_result("faults", {"runs": runs, "limit_s": args.limit, "keepalive": net.KEEPALIVE,
                                   "slurmd_timeout_s": slurmd_timeout, "ddp_timeout_s": DDPSpec().timeout_s,
                                   "horovod_stall_s": horovod_stall_defaults()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
