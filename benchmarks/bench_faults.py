"""How soon a lost node ends a job, on two emulated nodes (slurm/cluster.sh start --nodes 2; root).

For each case, the demo job (shrunk) trains on 2 nodes × 2 ranks; once a few metrics records are
written, node2's ranks are killed or node2's link is taken down, and the seconds until the
launcher returns are measured, with the line that names the lost node. A case still running
after --limit seconds counts as a hang (and is killed). Writes benchmarks/results/faults-<machine>.json.

    .venv/bin/python benchmarks/bench_faults.py [--repeats 1] [--limit 120]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write_result

sys.path.insert(0, str(REPO))
from mpidl import net  # noqa: E402

CLUSTER = str(REPO / "slurm" / "cluster.sh")
PYTHON = str(REPO / ".venv" / "bin" / "python")
DEMO = ["data.synth.rows=4000", "data.synth.size=8", "data.synth.noise=100", "model.args.width=16",
        "data.batch=32", "epochs=200", "log_every=2"]
CASES = [  # (launcher, backend, fault)
    ("mpirun", "mpi", "kill"), ("mpirun", "ddp", "kill"), ("mpirun", "horovod", "kill"),
    ("srun -K", "mpi", "kill"), ("srun -K", "ddp", "kill"), ("srun -K", "horovod", "kill"),
    ("mpirun", "mpi", "link down"), ("srun -K", "mpi", "link down"),
]
NAMING = ("node2", "rank 2", "rank 3")


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


def one(state: Path, env: dict, made: list[list[str]], launcher: str, backend: str, fault: str, limit: float,
        work: Path) -> dict:
    out = work / f"{launcher.split()[0]}-{backend}-{fault.replace(' ', '')}-{time.monotonic_ns()}"
    sets = [f"backend={backend}", f"data.files={work / 'demo.h5'}", f"output={out}", *DEMO]
    train = [PYTHON, "-m", "mpidl.cli", "train", str(REPO / "jobs" / "demo.yaml"), *[x for s in sets for x in ("--set", s)]]
    if launcher == "mpirun":
        cmd = ["mpirun", "-H", "node1:2,node2:2", "-np", "4", "--mca", "plm_rsh_agent", f"{CLUSTER} exec", *train]
    else:
        cmd = ["srun", "-K", "-N", "2", "--ntasks-per-node=2", "--mpi=pmix", *train]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    metrics = out / "metrics.jsonl"
    while p.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    ns = next(what for kind, what in made if kind == "netns" and what.endswith("-node2"))
    link = next(what for kind, what in made if kind == "link" and what.endswith("v2"))
    t0 = time.monotonic()
    if fault == "kill":
        for pid in in_netns(ns, str(out)):
            os.kill(pid, signal.SIGKILL)
    else:
        subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        _, err = p.communicate(timeout=limit)
        seconds: float | None = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        seconds = None
    for pid in in_netns(ns, str(out)) + in_netns(next(w for k, w in made if k == "netns" and w.endswith("-node1")),
                                                 str(out)):
        os.kill(pid, signal.SIGKILL)
    if fault != "kill":
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
        for _ in range(240):
            st = subprocess.run(["sinfo", "-h", "-n", "node2", "-o", "%T"], capture_output=True, text=True,
                                env=env).stdout.strip()
            if st == "idle":
                break
            if st.startswith("down"):
                subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], env=env)
            time.sleep(0.5)
    line = next((ln.strip() for ln in err.splitlines() if any(n in ln for n in NAMING)
                 and ("error" in ln.lower() or "noticed" in ln or "daemon" in ln.lower())), "")
    return {"launcher": launcher, "backend": backend, "fault": fault, "seconds": seconds,
            "exit": p.returncode, "line": line}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--limit", type=float, default=120, help="seconds after the fault that count as a hang")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_faults: needs root (emulated nodes)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mpidl-faults-") as tmp:
        work = Path(tmp)
        state = work / "cluster"
        env = {**os.environ, "MPIDL_SLURM_DIR": str(state), "MPIDL_SLURMCTLD_PORT": str(free_port()),
               "MPIDL_SLURMD_PORT": str(free_port()), "SLURM_CONF": str(state / "slurm.conf"),
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.update(net.launcher_env(env))
        subprocess.run(["bash", CLUSTER, "start", "--nodes", "2"], env=env, check=True)
        try:
            made = [line.split(" ", 1) for line in (state / "made").read_text().splitlines()]
            runs = [one(state, env, made, *case, args.limit, work) for _ in range(args.repeats) for case in CASES]
        finally:
            subprocess.run(["bash", CLUSTER, "stop"], env=env)
    print(f"{'launcher':9} {'backend':8} {'fault':10} {'seconds':>8} {'exit':>5}  line naming the loss")
    for r in runs:
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "HANG"
        print(f"{r['launcher']:9} {r['backend']:8} {r['fault']:10} {secs:>8} {r['exit']:>5}  {r['line'][:90]}")
    path = write_result("faults", {"runs": runs, "limit_s": args.limit, "keepalive": net.KEEPALIVE,
                                   "slurmd_timeout_s": 30})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
