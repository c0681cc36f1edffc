"""A stuck rank and a lost node on two emulated nodes (slurm/cluster.sh start --nodes 2; root).

The demo job (shrunk) trains on 2 nodes × 2 ranks, every backend, under both launchers:

stuck       the last rank's training thread hangs at its 7th forward pass while its process lives
            (`mpirun -H node1:2,node2:2` through the cluster's launch agent, and `srun -K`), with
            `watchdog_s` = --watchdog: the seconds from the hang to the launcher's exit, the exit
            status and the line that names the rank.
lost node   a SLURM job (`mpidl submit --standalone`, slurm.nodes 1-2, checkpoint.every_minutes)
            loses node2 once training runs: its slurmd killed ("slurmd"), or its link taken down
            ("link"); the two alternate over the backends so each launcher meets both. Measured:
            the seconds from the fault until SLURM requeued the job, until it ran again, and until
            it trained again (its first progress line after "resumed from"); the steps lost (the
            first run's last logged step minus the step resumed from); the world size after; and
            whether the finished model equals a run resumed by hand from the same checkpoint on
            as many ranks (srun on node1).

The old faults that end a job under a bare launcher (`kill`: node2's ranks killed; `link down`)
are still there (--faults kill,"link down"); benchmarks/results/faults-cpu2.json holds their
figures and the stuck rank before the watchdog. A case still running after --limit seconds
counts as a hang (and is killed). Writes benchmarks/results/<--name>-<machine>.json.

    .venv/bin/python benchmarks/bench_faults.py [--faults stuck,"lost node"] [--watchdog 10]
        [--launchers mpirun,srun] [--backends mpi,ddp,horovod] [--epochs 300] [--limit 600]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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
        "data.batch=32", "log_every=2"]
LAUNCHERS = ("mpirun", "srun")
BACKENDS = ("mpi", "ddp", "horovod")
FAULTS = ("stuck", "lost node", "kill", "link down")
# The first stderr line that names the loss: the watchdog's, the launcher's, Horovod's stall report, Gloo's timeout.
NAMING = re.compile(r".*error: watchdog: .*|srun: error: (node2|Node failure).*|mpirun noticed that process rank .*|"
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


def node_state(env: dict, node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True,
                          env=env).stdout.strip()


def node2_back(env: dict, state: Path) -> None:
    """node2 back in service: its slurmd running (started again if it was killed), resumed if down."""
    pidfile = state / "run" / "slurmd-node2.pid"
    alive = pidfile.exists() and Path(f"/proc/{pidfile.read_text().strip()}").exists()
    if not alive:
        subprocess.run(["bash", CLUSTER, "exec", "node2", f"slurmd -f {state / 'slurm.conf'} -N node2"], env=env,
                       check=True)
    for _ in range(240):
        st = node_state(env, "node2")
        if st == "idle":
            return
        if st.startswith("down"):
            subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], env=env)
        time.sleep(0.5)


def job_info(env: dict, job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def final_model(folder: Path) -> dict:
    import torch

    return torch.load(sorted(folder.glob("ckpt-*.pt"))[-1], map_location="cpu", weights_only=True)["model"]


def first_run(metrics: Path, lines: int) -> tuple[int, float]:
    """The last step the first run logged and its mean step time: its records are the first
    `lines` lines of metrics.jsonl, counted when SLURM requeued the job (before the requeued run
    appends). Neither the epoch nor the step tells the runs apart: a first run that stopped
    progressing right after its checkpoint is followed by records of a later epoch."""
    last, times = 0, []
    for line in metrics.read_text().splitlines()[:lines]:
        rec = json.loads(line)
        if "loss" not in rec:
            continue
        last = rec["step"]
        times.append(rec["step_time"])
    return last, sum(times) / max(1, len(times))


# ------------------------------------------------------------------ bare launchers: stuck, kill, link down
def one(env: dict, made: list[list[str]], launcher: str, backend: str, fault: str, limit: float, work: Path,
        watchdog_s: float, epochs: int, state: Path) -> dict:
    out = work / f"{launcher}-{backend}-{fault.replace(' ', '')}-{time.monotonic_ns()}"
    sets = [f"backend={backend}", f"data.files={work / 'demo.h5'}", f"output={out}", f"epochs={epochs}", *DEMO]
    if fault == "stuck":
        sets.append(f"watchdog_s={watchdog_s}")
    train = [PYTHON, "-c", TRAIN, fault, str(REPO / "jobs" / "demo.yaml"), *sets]
    if launcher == "mpirun":
        cmd = ["mpirun", "-H", "node1:2,node2:2", "-np", "4", "--bind-to", "none", "--mca", "plm_rsh_agent",
               f"{CLUSTER} exec", *train]
    else:
        cmd = ["srun", "-K", "-N", "2", "--ntasks-per-node=2", "--mpi=pmix", *train]
    with open(f"{out}.stderr", "w+") as err:  # a file: a full pipe would stall the job
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env, cwd=REPO)
        metrics, stuck = out / "metrics.jsonl", out.parent / (out.name + ".stuck")
        nodes = {n: next(w for k, w in made if k == "netns" and w.endswith("-" + n)) for n in ("node1", "node2")}
        link = next(what for kind, what in made if kind == "link" and what.endswith("v2"))
        while p.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.2)
        if fault == "stuck":
            while p.poll() is None and not stuck.exists():
                time.sleep(0.05)
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
            node2_back(env, state)
        err.seek(0)
        text = err.read()
        found = NAMING.search(text)
    row = {"launcher": launcher, "backend": backend, "fault": fault, "seconds": seconds, "exit": p.returncode,
           "line": found.group(0).replace("\n", " ").strip()[:300] if found else ""}
    if fault == "stuck":
        row["watchdog_s"] = watchdog_s
        row["named"] = bool(re.search(r"watchdog: rank 3 on node2 made no progress for \d+ s, in forward/backward "
                                      r"of step 7", text))
    return row


# ------------------------------------------------------------------ a lost node under SLURM
def lost(env: dict, made: list[list[str]], launcher: str, backend: str, kind: str, limit: float, work: Path,
         epochs: int, every_minutes: float, state: Path) -> dict:
    name = f"lost-{launcher}-{backend}-{kind}"
    folder = work / name
    folder.mkdir()
    out = folder / "run"
    sets = [f"backend={backend}", f"data.files={work / 'demo.h5'}", f"output={out}", f"epochs={epochs}", *DEMO,
            f"checkpoint.every_minutes={every_minutes}", "checkpoint.keep=1000", f"slurm.launcher={launcher}",
            "slurm.nodes=1-2", "slurm.tasks_per_node=2", f"name={name}"]
    row: dict = {"launcher": launcher, "backend": backend, "fault": f"lost node ({kind})",
                 "checkpoint_every_minutes": every_minutes}
    cmd = [PYTHON, "-m", "mpidl.cli", "submit", str(REPO / "jobs" / "demo.yaml"), "--standalone",
           *[x for kv in sets for x in ("--set", kv)]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    found = re.search(r"submitted job (\d+)", r.stdout)
    if not found:
        return {**row, "seconds": None, "line": "not submitted: " + (r.stdout + r.stderr)[-300:]}
    job = found.group(1)
    log, metrics = folder / f"slurm-{job}.out", out / "metrics.jsonl"
    link = next(what for kind_, what in made if kind_ == "link" and what.endswith("v2"))
    node2 = next(w for k, w in made if k == "netns" and w.endswith("-node2"))
    deadline = time.monotonic() + limit
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5
                   and list((out / "checkpoints").glob("ckpt-*.pt"))):
            if time.monotonic() > deadline or job_info(env, job).get("JobState") not in ("PENDING", "RUNNING"):
                return {**row, "seconds": None, "line": "ended or stalled before the fault: "
                        + (log.read_text()[-300:] if log.exists() else "")}
            time.sleep(0.2)
        row["ranks_before"] = 4
        if kind == "slurmd":
            os.kill(int((state / "run" / "slurmd-node2.pid").read_text()), signal.SIGKILL)
        else:
            subprocess.run(["ip", "link", "set", link, "down"], check=True)
        t0 = time.monotonic()
        seen: dict[str, float] = {}
        first_lines = 0
        while time.monotonic() < deadline:
            info = job_info(env, job)
            st, restarts = info.get("JobState"), int(info.get("Restarts", "0") or 0)
            now = time.monotonic() - t0
            if restarts >= 1:
                if "requeued_s" not in seen:  # the first run has ended: its records are all written
                    first_lines = len(metrics.read_text().splitlines())
                seen.setdefault("requeued_s", now)
                if st == "RUNNING":
                    seen.setdefault("running_again_s", now)
            text = log.read_text() if log.exists() else ""
            at = text.find("resumed from ")
            if at >= 0 and "samples/s" in text[at:]:
                seen.setdefault("training_again_s", now)
            if st in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            time.sleep(0.2)
        info = job_info(env, job)
        row.update(seen)
        row["seconds"] = seen.get("training_again_s")
        row["state"], row["restarts"] = info.get("JobState"), int(info.get("Restarts", "0") or 0)
        row["node2_state_after"] = node_state(env, "node2")
    finally:
        if kind == "link":
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        if job_info(env, job).get("JobState") in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job], env=env)
        for pid in in_netns(node2, str(out)):
            os.kill(pid, signal.SIGKILL)
        node2_back(env, state)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    if row.get("state") != "COMPLETED" or not summary.get("resumed_from"):
        return {**row, "line": (log.read_text()[-300:] if log.exists() else "")}
    resumed = Path(summary["resumed_from"])
    row["ranks_after"] = summary["world"]["size"]
    row["resumed_step"] = int(resumed.stem.split("-")[1])
    row["first_run_last_step"], step_time = first_run(metrics, first_lines)
    row["steps_lost"] = row["first_run_last_step"] - row["resumed_step"]
    row["work_lost_s"] = row["steps_lost"] * step_time  # at the first run's mean step time
    row["steps_per_epoch_before"] = 4000 * 9 // 10 // (4 * 32)
    # by hand: the same checkpoint, on as many ranks (srun on node1), into another folder
    hand = folder / "hand"
    (hand / "checkpoints").mkdir(parents=True)
    shutil.copy(resumed, hand / "checkpoints" / resumed.name)
    hand_sets = [s for s in sets if not s.startswith(("output=", "checkpoint.every_minutes"))] + [f"output={hand}"]
    r = subprocess.run(["srun", "-K", "-N", "1", "-w", "node1", f"--ntasks-per-node={row['ranks_after']}",
                        "--mpi=pmix", PYTHON, "-m", "mpidl.cli", "train", str(REPO / "jobs" / "demo.yaml"), "--resume",
                        *[x for kv in hand_sets for x in ("--set", kv)]],
                       capture_output=True, text=True, env=env, cwd=folder, timeout=limit)
    if r.returncode == 0:
        import torch

        a, b = final_model(out / "checkpoints"), final_model(hand / "checkpoints")
        row["equals_hand_resumed"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:
        row["equals_hand_resumed"] = None
        row["line"] = "hand-resumed run failed: " + r.stderr[-300:]
    row.setdefault("line", "")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=600, help="seconds after the fault that count as a hang")
    ap.add_argument("--faults", default="stuck,lost node", help=f"of {','.join(FAULTS)}")
    ap.add_argument("--launchers", default=",".join(LAUNCHERS), help="of %(default)s")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="of %(default)s")
    ap.add_argument("--watchdog", type=float, default=10, help="watchdog_s of the stuck cases")
    ap.add_argument("--epochs", type=int, default=300, help="the demo's length: long enough to outlast the fault")
    ap.add_argument("--every-minutes", type=float, default=0.1, help="checkpoint.every_minutes of the lost-node jobs")
    ap.add_argument("--name", default="faults-recovery", help="the result file's name")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_faults: needs root (emulated nodes)", file=sys.stderr)
        return 2
    faults = args.faults.split(",")
    launchers, backends = args.launchers.split(","), args.backends.split(",")
    with tempfile.TemporaryDirectory(prefix="mpidl-faults-") as tmp:
        work = Path(tmp)
        state = work / "cluster"
        env = {**os.environ, "MPIDL_SLURM_DIR": str(state), "MPIDL_SLURMCTLD_PORT": str(free_port()),
               "MPIDL_SLURMD_PORT": str(free_port()), "SLURM_CONF": str(state / "slurm.conf"),
               **LOCAL_MPIRUN_ENV, **OVERSUBSCRIBE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.update(net.launcher_env(env))
        subprocess.run(["bash", CLUSTER, "start", "--nodes", "2"], env=env, check=True)
        runs = []
        try:
            conf = (state / "slurm.conf").read_text().splitlines()
            slurmd_timeout = next(int(line.split("=")[1]) for line in conf if line.startswith("SlurmdTimeout="))
            cred_expire = next((int(line.rsplit("=", 1)[1]) for line in conf if "cred_expire=" in line), 120)
            made = [line.split(" ", 1) for line in (state / "made").read_text().splitlines()]
            for fault in faults:
                for launcher in launchers:
                    for i, backend in enumerate(backends):
                        if fault == "lost node":
                            # slurmd killed and link down alternate, so each launcher meets both
                            kind = ("slurmd", "link")[(i + launchers.index(launcher)) % 2]
                            runs.append(lost(env, made, launcher, backend, kind, args.limit, work, args.epochs,
                                             args.every_minutes, state))
                        else:
                            runs.append(one(env, made, launcher, backend, fault, args.limit, work, args.watchdog,
                                            args.epochs, state))
                        print(json.dumps(runs[-1]), flush=True)
        finally:
            subprocess.run(["bash", CLUSTER, "stop"], env=env)
    print(f"{'launcher':8} {'backend':8} {'fault':20} {'seconds':>8} {'exit':>5}  line naming the loss / recovery")
    for r in runs:
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "HANG"
        if r["fault"].startswith("lost"):
            what = (f"requeued {r.get('requeued_s', float('nan')):.1f} s, running {r.get('running_again_s', float('nan')):.1f}"
                    f" s; {r.get('ranks_before')} -> {r.get('ranks_after')} ranks; steps lost {r.get('steps_lost')}; "
                    f"equals hand-resumed: {r.get('equals_hand_resumed')}")
            print(f"{r['launcher']:8} {r['backend']:8} {r['fault']:20} {secs:>8} {r.get('state', '?'):>5}  {what}")
        else:
            print(f"{r['launcher']:8} {r['backend']:8} {r['fault']:20} {secs:>8} {r['exit']:>5}  {r['line'][:90]}")
    path = write_result(args.name, {
        "runs": runs, "limit_s": args.limit, "keepalive": net.KEEPALIVE, "slurmd_timeout_s": slurmd_timeout,
        "ddp_timeout_s": DDPSpec().timeout_s, "horovod_stall_s": horovod_stall_defaults(),
        "watchdog_s": args.watchdog, "epochs": args.epochs, "cred_expire_s": cred_expire})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
