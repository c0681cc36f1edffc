"""Two emulated nodes on this machine (slurm/cluster.sh start --nodes 2): SLURM, mpirun, the three
backends, node-local staging, checkpoints and faults across nodes.

Each node is a network + UTS namespace with its own host name and address, linked to the other
and to the controller by a bridge. One cluster serves the session (`two_nodes`); it is stopped at
the end and nothing it made may be left. Needs root, iproute2 and SLURM; skips elsewhere.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (CLUSTER_SH, _free_port, MPIRUN, PYTHON, ROOT, clean_env, multinode_unavailable, mpidl_cmd,
                      pycode, run, sbatch_wait, start_nodes, stop_nodes)
from mpidl import net
from test_train import BACKENDS

AGENT = f"{CLUSTER_SH} exec"   # mpirun's launch agent: enters a node's namespaces
needs_nodes = pytest.mark.skipif(multinode_unavailable() is not None, reason=str(multinode_unavailable()))


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def srun(nodes, per_node: int, args: list[str], *, timeout: float = 300, env: dict | None = None,
         where: list[str] = ()):
    """`srun -K -N n --ntasks-per-node=k --mpi=pmix ...` from this (the controller's) side.

    -K (--kill-on-bad-exit): a task that dies takes the step down with it; without it SLURM leaves
    the other ranks blocked in a collective with a dead peer.
    """
    n = len(where) or 2
    placement = ["-w", ",".join(where)] if where else []
    return run(["srun", "-K", "-N", str(n), f"--ntasks-per-node={per_node}", "--mpi=pmix", *placement, *args],
               env={**nodes.env, **(env or {})}, timeout=timeout)


def mpirun_on_nodes_cmd(per_node: int, args: list[str], env: dict | None = None) -> list[str]:
    """`mpirun -H node1:k,node2:k`, its daemons entering the nodes through cluster.sh (as ssh would)."""
    forward = ["-x", net.VAR] if net.VAR in (env or {}) else []  # what a real cluster's ssh would not carry
    return [MPIRUN, "-H", f"node1:{per_node},node2:{per_node}", "-np", str(2 * per_node),
            "--mca", "plm_rsh_agent", AGENT, *forward, *args]


def mpirun_on_nodes(nodes, per_node: int, args: list[str], *, timeout: float = 300, env: dict | None = None):
    env = {**nodes.env, **(env or {})}
    return run(mpirun_on_nodes_cmd(per_node, args, env), env={**env, **net.launcher_env(env)}, timeout=timeout)


def launch(nodes, launcher: str, per_node: int, args: list[str], *, timeout: float = 300, env: dict | None = None):
    """2 nodes × per_node ranks, under srun or under mpirun."""
    if launcher == "srun":
        return srun(nodes, per_node, args, timeout=timeout, env=env)
    return mpirun_on_nodes(nodes, per_node, args, timeout=timeout, env=env)


# ------------------------------------------------------------------ the cluster itself
@needs_nodes
def test_two_nodes_idle_each_its_own_host_and_address(two_nodes):
    r = run(["sinfo", "-h", "-N", "-o", "%N %T"], env=two_nodes.env)
    assert r.stdout.split() == ["node1", "idle", "node2", "idle"], r.output
    seen = {}
    for node in ("node1", "node2"):
        r = run(["bash", CLUSTER_SH, "exec", node, "hostname; ip -o -4 addr show"], env=two_nodes.env)
        assert r.returncode == 0, r.output
        host, *addrs = r.stdout.splitlines()
        seen[host] = [a.split()[3] for a in addrs if " lo " not in a]  # e.g. 10.x.y.2/24
    subnet = two_nodes.subnet.rsplit(".", 1)[0]  # "10.x.y"
    assert set(seen) == {"node1", "node2"}
    assert seen["node1"] == [f"{subnet}.2/24"] and seen["node2"] == [f"{subnet}.3/24"]
    # a node's own name resolves to 127.0.1.1 there (Debian's /etc/hosts), the other's to its address
    resolve = f"{PYTHON} -c 'import socket; print(*map(socket.gethostbyname, (\"node1\", \"node2\")))'"
    r = run(["bash", CLUSTER_SH, "exec", "node1", resolve], env=two_nodes.env)
    assert r.stdout.split() == ["127.0.1.1", f"{subnet}.3"], r.output
    # the nodes reach each other (a TCP connection from node2 to node1)
    server = subprocess.Popen(["bash", CLUSTER_SH, "exec", "node1",
                               f"exec {PYTHON} -c 'import socket; s = socket.create_server((\"\", 0)); "
                               f"print(s.getsockname()[1], flush=True); c, a = s.accept(); print(a[0], flush=True)'"],
                              stdout=subprocess.PIPE, text=True, env=clean_env(two_nodes.env))
    try:
        port = server.stdout.readline().strip()
        r = run(["bash", CLUSTER_SH, "exec", "node2",
                 f"{PYTHON} -c 'import socket; socket.create_connection((\"node1\", {port}), timeout=10)'"],
                env=two_nodes.env)
        assert r.returncode == 0, r.output
        assert server.stdout.readline().strip() == f"{subnet}.3"
    finally:
        server.kill()
        server.wait()


def test_start_stop_removes_exactly_what_it_made(tmp_path):
    if multinode_unavailable():
        pytest.skip(multinode_unavailable())
    nodes = start_nodes(tmp_path / "c", 2)
    kinds = sorted({kind for kind, _ in nodes.made})
    assert kinds == ["link", "mnt", "mount", "netns", "pidfile", "uts"]
    assert len([1 for k, _ in nodes.made if k == "netns"]) == 2
    assert len(nodes.leftovers()) == len(nodes.made)  # while it runs, all of it is there
    # something still running inside a node (a job step's child, say) is ended by stop too
    sleeper = subprocess.Popen(["bash", CLUSTER_SH, "exec", "node2", "exec sleep 600"], env=clean_env(nodes.env))
    try:
        for _ in range(50):
            if nodes.pids_on("node2", "sleep 600"):
                break
            time.sleep(0.1)
        assert nodes.pids_on("node2", "sleep 600")
        assert stop_nodes(nodes) == []
        assert sleeper.wait(timeout=10) != 0
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    again = run(["bash", CLUSTER_SH, "stop"], env=nodes.env)
    assert again.returncode == 0 and nodes.leftovers() == []


def test_clusters_side_by_side_share_munged_whichever_stops_first(tmp_path):
    """Two clusters on one machine (two sessions, a user's and the suite's): one munged serves
    both, and a cluster's stop leaves it to the others still running (other clusters of the
    session may run beside this test, so the last stop's end of munged is not asserted here:
    slurm/cluster.sh, MUNGED_OURS)."""
    if multinode_unavailable():
        pytest.skip(multinode_unavailable())
    one = {"MPIDL_SLURM_DIR": str(tmp_path / "one"), "MPIDL_SLURMCTLD_PORT": str(_free_port()),
           "MPIDL_SLURMD_PORT": str(_free_port())}
    (tmp_path / "one").mkdir(mode=0o700)
    started = run(["bash", CLUSTER_SH, "start"], env=one, timeout=120)
    nodes = None
    try:
        assert started.returncode == 0, started.output
        nodes = start_nodes(tmp_path / "two", 2)
        assert run(["bash", CLUSTER_SH, "stop"], env=one, timeout=90).returncode == 0  # the first up stops first
        hosts = run(["srun", "-N", "2", "hostname"], env=nodes.env, timeout=60)
        assert hosts.returncode == 0 and sorted(hosts.stdout.split()) == ["node1", "node2"], hosts.output
    finally:
        run(["bash", CLUSTER_SH, "stop"], env=one, timeout=90)
        if nodes is not None:
            assert stop_nodes(nodes) == []


def test_nodes_refused_in_one_line_where_they_cannot_work(tmp_path):
    env = {"MPIDL_SLURM_DIR": str(tmp_path / "c")}
    script = Path(CLUSTER_SH).read_text()
    if os.geteuid() == 0:
        # as an ordinary user (the script on stdin: this checkout need not be readable by them)
        as_user = subprocess.run(["runuser", "-u", "nobody", "--", "bash", "-s", "--", "start", "--nodes", "2"],
                                 input=script, capture_output=True, text=True, env=clean_env(env), timeout=30)
    else:
        as_user = subprocess.run(["bash", "-s", "--", "start", "--nodes", "2"], input=script, capture_output=True,
                                 text=True, env=clean_env(env), timeout=30)
    assert as_user.returncode == 2, as_user.stderr
    assert as_user.stderr.splitlines() == ["[slurm] error: start --nodes 2 needs root (network namespaces, veth links)"]
    if os.geteuid() == 0:  # root, but no iproute2 on PATH
        no_ip = subprocess.run(["/bin/bash", CLUSTER_SH, "start", "--nodes", "2"], capture_output=True, text=True,
                               env={**clean_env(env), "PATH": str(tmp_path)}, timeout=30)
        assert no_ip.returncode == 2
        assert no_ip.stderr.splitlines() == ["[slurm] error: start --nodes 2 needs 'ip' (iproute2, util-linux)"]
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ launching across the nodes
@needs_nodes
def test_srun_world_across_nodes(two_nodes):
    r = srun(two_nodes, 2, mpidl_cmd("info", "--json"), env={"MPIDL_NET": two_nodes.subnet}, timeout=180)
    assert r.returncode == 0, r.output
    got = rows(r.stdout)
    assert [(w["rank"], w["size"], w["host"], w["local_rank"], w["local_size"]) for w in got] == [
        (0, 4, "node1", 0, 2), (1, 4, "node1", 1, 2), (2, 4, "node2", 0, 2), (3, 4, "node2", 1, 2)]
    assert all(w["launcher"] == "srun" for w in got)
    # MPIDL_NET=<subnet> became each node's own interface and address on it
    subnet = two_nodes.subnet.rsplit(".", 1)[0]
    assert [w["net"] for w in got] == [f"mpidl0 {subnet}.2"] * 2 + [f"mpidl0 {subnet}.3"] * 2


@pytest.mark.mpi  # mpirun started inside mpidl (or inside the batch job), out of the static look's sight
@needs_nodes
def test_mpirun_inside_sbatch_across_nodes(two_nodes, tmp_path):
    out = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH -N 2 --ntasks-per-node=2 -o {shlex.quote(str(out))}\n"
        f"cd {shlex.quote(str(ROOT))}\n"
        f"mpirun {shlex.join(mpidl_cmd('info', '--json'))}\n")
    _, state = sbatch_wait(script, env=two_nodes.env, timeout=240)
    assert state == "COMPLETED 0:0", state + "\n" + (out.read_text() if out.exists() else "")
    for _ in range(20):  # the output file is flushed by slurmd as the job ends
        if out.exists() and len(rows(out.read_text())) == 4:
            break
        time.sleep(0.5)
    got = rows(out.read_text())
    assert [(w["rank"], w["host"], w["local_rank"], w["local_size"], w["launcher"]) for w in got] == [
        (0, "node1", 0, 2, "mpirun"), (1, "node1", 1, 2, "mpirun"),
        (2, "node2", 0, 2, "mpirun"), (3, "node2", 1, 2, "mpirun")]


TRANSPORTS = """
import sys, numpy as np, mpidl
from mpi4py import MPI
w = mpidl.init()
a = np.full(1 << 16, w.rank + 1.0)
w.comm.Allreduce(MPI.IN_PLACE, a)
assert (a == w.size * (w.size + 1) / 2).all()
seen = w.comm.gather((w.rank, w.host, float(a[0])), root=0)
if w.rank == 0:  # a file, not stdout: the verbose transport messages interleave with the ranks' lines
    open(sys.argv[1], "w").write(repr(seen))
"""


@needs_nodes
def test_mpirun_with_namespace_agent_tcp_between_nodes_shared_memory_within(two_nodes, tmp_path):
    seen = tmp_path / "seen"
    r = mpirun_on_nodes(two_nodes, 2, ["--mca", "btl_base_verbose", "30", *pycode(TRANSPORTS), str(seen)],
                        timeout=180)
    assert r.returncode == 0, r.output[-3000:]
    assert ast.literal_eval(seen.read_text()) == [(0, "node1", 10.0), (1, "node1", 10.0), (2, "node2", 10.0),
                                      (3, "node2", 10.0)]
    # OpenMPI's own account of the transport it chose for each peer
    used = {(line.split("Using ")[1].split()[0], line.split("on node ")[1].split()[0], line[1:6])
            for line in r.output.splitlines() if "mca: bml: Using" in line and "btl for send to" in line}
    assert ("vader", "node1", "node1") in used and ("vader", "node2", "node2") in used
    assert ("tcp", "node2", "node1") in used and ("tcp", "node1", "node2") in used
    assert not {u for u in used if u[0] == "vader" and u[1] != u[2]}, "shared memory across nodes"


SPLIT_BY_HOST = """
import json, mpidl
w = mpidl.init()
rows = w.comm.gather(w.as_dict(), root=0)
if w.rank == 0:
    for r in rows:
        print(json.dumps(r), flush=True)
"""


def test_ranks_sharing_memory_but_not_a_host_name_are_different_nodes(tmp_path):
    """Under one mpirun (one orted: MPI calls them all node-local), ranks in different UTS namespaces
    (containers on one kernel, emulated nodes) have different host names: each is its own node."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (UTS namespaces)")
    if MPIRUN is None:
        pytest.skip("mpirun not installed")
    prog = shlex.join(pycode(SPLIT_BY_HOST))
    apps = []
    for host, count in (("hosta", 2), ("hostb", 1)):
        apps += [":", "-np", str(count), "unshare", "--uts", "sh", "-c", f"hostname {host} && exec {prog}"]
    r = run([MPIRUN, *apps[1:]], timeout=120)
    assert r.returncode == 0, r.output
    got = rows(r.stdout)
    assert [(w["rank"], w["host"], w["local_rank"], w["local_size"]) for w in got] == [
        (0, "hosta", 0, 2), (1, "hosta", 1, 2), (2, "hostb", 0, 1)]


# ------------------------------------------------------------------ training across the nodes
# The demo job (jobs/demo.yaml) shrunk: 8×8 images, a narrower CNN, 3600 training rows, 3 epochs
# (held-out accuracy about 0.95 on 2 or 4 ranks; the run's time is mostly the ranks' start).
SMALL_DEMO = ["data.synth.rows=4000", "data.synth.size=8", "data.synth.noise=100", "model.args.width=16",
              "data.batch=32", "epochs=3", "log_every=5"]

TRAIN = """
import hashlib, json, sys, h5py, mpidl
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

class Capture(Callback):
    def on_end(self, trainer, summary):
        self.net, self.backend = trainer.net, trainer.backend
        self.staged = path = trainer.inputs.loader.staged_path  # removed when train() returns
        if path is not None:
            with h5py.File(path, "r") as h:
                self.staged = [str(path), str(h.attrs["mpidl_staged_by"])]

w = mpidl.init()
cap = Capture()
args = sys.argv[1:]
resume = "--resume" in args
train(load_spec(args[0], [a for a in args[1:] if a != "--resume"]), resume=resume, callbacks=[cap])
mine = {"rank": w.rank, "host": w.host, "local_rank": w.local_rank,
        "params": hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in cap.net.parameters())).hexdigest(),
        "rendezvous": getattr(cap.backend, "rendezvous", None), "interface": getattr(cap.backend, "interface", None),
        "staged": cap.staged}
seen = w.comm.gather(mine, root=0)
if w.rank == 0:
    print("RANKS " + json.dumps(seen), flush=True)
"""


def demo_args(tmp: Path, backend: str, run_name: str, *extra: str) -> list[str]:
    sets = [f"backend={backend}", f"data.files={tmp.parent / 'demo-small.h5'}", f"output={tmp / run_name}",
            *SMALL_DEMO, *extra]
    return [str(ROOT / "jobs" / "demo.yaml"), *sets]


def cli_args(args: list[str]) -> list[str]:
    """demo_args for `mpidl train`: each setting after --set."""
    job, *sets = args
    return ["train", job, *[x for kv in sets for x in ("--set", kv)]]


def ranks_line(stdout: str) -> list[dict]:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RANKS "))[6:])


# Each backend on 2 nodes × 2 ranks under srun (with node-local staging, MPIDL_NET unset: the
# Debian 127.0.1.1 trap is live) and 2 nodes × 1 rank under mpirun (MPIDL_NET names the subnet).
TRAIN_CASES = [(b, per_node, launcher) for b in BACKENDS for per_node, launcher in ((2, "srun"), (1, "mpirun"))]


@needs_nodes
@pytest.mark.parametrize("backend,per_node,launcher", TRAIN_CASES)
def test_demo_trains_across_nodes(two_nodes, tmp_path, backend, per_node, launcher):
    stage = tmp_path / "stage"   # one folder both nodes see: each node's files are its own anyway
    extra = [f"data.stage_dir={stage}"] if per_node == 2 else []
    env = {net.VAR: two_nodes.subnet} if launcher == "mpirun" else {}
    r = launch(two_nodes, launcher, per_node, pycode(TRAIN) + demo_args(tmp_path, backend, "run", *extra),
               env=env, timeout=400)
    assert r.returncode == 0, r.output[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["val_accuracy"] >= 0.8, summary["final"]
    assert summary["world"]["size"] == 2 * per_node
    seen = ranks_line(r.stdout)
    assert [(w["rank"], w["host"], w["local_rank"]) for w in seen] == [
        (i, "node1" if i < per_node else "node2", i % per_node) for i in range(2 * per_node)]
    assert len({w["params"] for w in seen}) == 1, "parameters differ between ranks"
    if backend == "ddp":
        # every rank met at node1's address on the link between the nodes (never 127.0.1.1, which
        # node1's host name resolves to there), and Gloo talks over that link on each node
        node1 = two_nodes.subnet.rsplit(".", 1)[0] + ".2"
        assert {w["rendezvous"].rsplit(":", 1)[0] for w in seen} == {node1}, seen
        assert {w["interface"] for w in seen} == {"mpidl0"}, seen
        assert f"ddp: rendezvous at {node1}:" in r.stdout
    # checkpoints: written by rank 0 alone, whole, into one folder
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts and all(name.startswith("ckpt-") and name.endswith(".pt") for name in ckpts), ckpts
    if per_node == 2:
        # staged once per node, by the node's local rank 0, one file for each rank on it, in the
        # user's private folder; every file removed when the run ended
        mine = stage / f"mpidl-{os.getuid()}"
        by = {}
        for w in seen:
            path, who = w["staged"]
            assert Path(path).parent == mine, path
            by[Path(path).name.split("-r")[-1].split("of")[0]] = who
        assert by == {"0": "node1 rank 0", "1": "node1 rank 0", "2": "node2 rank 2", "3": "node2 rank 2"}
        assert list(mine.iterdir()) == []


@needs_nodes
def test_resume_on_another_node_count(two_nodes, tmp_path):
    """2 nodes × 1 rank stop mid-run; 1 node × 2 ranks, on node2 (not where rank 0 wrote the
    checkpoint), resume from the folder both see and finish the job."""
    args = demo_args(tmp_path, "mpi", "run")
    r = srun(two_nodes, 1, mpidl_cmd(*cli_args(args), "--stop-at", "70"), timeout=400)
    assert r.returncode == 0, r.output[-4000:]
    # 3600 rows / (2 ranks × 32) = 56 steps an epoch: the epoch's checkpoint and the stop's
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "ckpt-000000056.pt", "ckpt-000000070.pt"]
    r = srun(two_nodes, 2, pycode(TRAIN) + args + ["--resume"], where=["node2"], timeout=400)
    assert r.returncode == 0, r.output[-4000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'ckpt-000000070.pt'}" in r.stdout, r.output[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world"]["size"] == 2 and summary["final"]["val_accuracy"] >= 0.8
    seen = ranks_line(r.stdout)
    assert [w["host"] for w in seen] == ["node2", "node2"] and len({w["params"] for w in seen}) == 1


# ------------------------------------------------------------------ faults across the nodes
# Each backend meets each fault under one of the two launchers; both launchers see each fault.
# (benchmarks/bench_faults.py times every launcher × backend × fault.)

def start_training(nodes, tmp_path: Path, backend: str, launcher: str, *, per_node: int = 2, code: str = "",
                   extra: tuple[str, ...] = (), env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """A long demo run across both nodes, started in the background; returns once it is mid-training
    (a few metrics records written). `code`: a script run instead of `mpidl train`."""
    args = demo_args(tmp_path, backend, "run", "epochs=200", "log_every=2", *extra)
    ranks = pycode(code) + args if code else mpidl_cmd(*cli_args(args))
    env = {**nodes.env, **(env or {})}
    if launcher == "srun":
        cmd = ["srun", "-K", "-N", "2", f"--ntasks-per-node={per_node}", "--mpi=pmix", *ranks]
    else:
        cmd = mpirun_on_nodes_cmd(per_node, ranks)
        env.update(net.launcher_env(env))
    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")  # files: a full pipe would stall it
    p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=clean_env(env), cwd=ROOT)
    p.stderr_path = tmp_path / "stderr"
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.3)
    assert p.poll() is None, f"exit {p.returncode} before the fault: {p.stderr_path.read_text()[-3000:]}"
    return p, tmp_path / "run"


def ended_within(p: subprocess.Popen, seconds: float) -> tuple[int, str]:
    """The job's exit status and stderr; a job still running after `seconds` is a hang: kill it, fail."""
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"the job was still running {seconds:.0f} s after the fault: {p.stderr_path.read_text()[-2000:]}")
    return p.returncode, p.stderr_path.read_text()


def end_leftovers(nodes, run_dir: Path) -> list[int]:
    """Kill what of this run still runs on either node (after a failed check); the pids found."""
    left = [pid for node in ("node1", "node2") for pid in nodes.pids_on(node, str(run_dir))]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def on_backends(*cases: tuple[str, str]) -> list[tuple[str, str]]:
    return [c for c in cases if c[0] in BACKENDS]


LOST = {  # the launcher's line naming what was lost
    "srun": r"srun: error: node2: tasks? 2(-3)?: Killed",  # task 3's death may come after srun -K ended
    "mpirun": r"mpirun noticed that process rank [23] with PID \d+ on node node2 exited on signal 9",
}


@needs_nodes
@pytest.mark.parametrize("backend,launcher", on_backends(("horovod", "srun"), ("ddp", "mpirun"), ("mpi", "srun")))
def test_killed_node_ends_the_job(two_nodes, tmp_path, backend, launcher):
    p, run_dir = start_training(two_nodes, tmp_path, backend, launcher)
    victims = two_nodes.pids_on("node2", str(run_dir))
    assert len(victims) == 2, victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    try:
        code, err = ended_within(p, 60)
    finally:
        left = end_leftovers(two_nodes, run_dir)
    assert code != 0
    assert re.search(LOST[launcher], err), err[-3000:]
    assert not left, "ranks left running after the job ended"


FAULT_ON = """
import sys, time, mpidl
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

w = mpidl.init()
LAST = w.size - 1   # on node2

class Fault(Callback):
    def on_start(self, trainer):
        calls = [0]
        def hook(module, args):
            calls[0] += 1
            if w.rank == LAST and calls[0] == 7:
                if sys.argv[1] == "raise":
                    raise RuntimeError(f"injected fault in rank {LAST} at step 7")
                time.sleep(600)   # stuck: this rank's training thread hangs, its process lives on
        trainer.net.register_forward_pre_hook(hook)

train(load_spec(sys.argv[2], sys.argv[3:]), callbacks=[Fault()])
print("finished", w.rank, flush=True)
"""


@needs_nodes
@pytest.mark.parametrize("backend,launcher", on_backends(("ddp", "srun"), ("horovod", "mpirun")))  # mpi: test_train
def test_exception_on_the_remote_node_shows_its_traceback_once(two_nodes, tmp_path, backend, launcher):
    args = demo_args(tmp_path, backend, "run")
    r = launch(two_nodes, launcher, 2, pycode(FAULT_ON) + ["raise", *args], timeout=300)
    assert r.returncode != 0
    assert "finished" not in r.stdout
    assert r.stderr.count("[rank 3] RuntimeError: injected fault in rank 3 at step 7") == 1, r.stderr[-3000:]
    assert r.stderr.count("Traceback") == 1, r.stderr[-3000:]


# A rank whose process lives but whose training stops (a hung read, a deadlock): no launcher
# notices. With watchdog_s above their timeouts, DDP's and Horovod's own end the job; mpidl's
# watchdog ends it on every backend (the mpi backend has no timeout of its own).
STUCK = {
    "ddp": (["ddp.timeout_s=10"], r"Timed out waiting 10000ms for (send|recv) operation to complete"),
    "horovod": (["horovod.stall_check_s=3", "horovod.stall_shutdown_s=10"],
                r"Missing ranks:\n1!: \[allreduce\."),
}


@needs_nodes
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in STUCK])
def test_stuck_rank_ends_the_job_after_the_backends_timeout(two_nodes, tmp_path, backend):
    settings, named = STUCK[backend]
    try:
        args = demo_args(tmp_path, backend, "run", "log_every=2", *settings)
        r = srun(two_nodes, 1, pycode(FAULT_ON) + ["stuck", *args], timeout=240)
    finally:
        left = end_leftovers(two_nodes, tmp_path / "run")
    assert r.returncode != 0 and "finished" not in r.stdout, r.output[-3000:]
    assert re.search(named, r.stderr), r.stderr[-3000:]
    assert not left


@needs_nodes
@pytest.mark.parametrize("backend", BACKENDS)
def test_stuck_rank_across_nodes_is_named_by_the_watchdog(two_nodes, tmp_path, backend):
    """The same stuck rank, with watchdog_s below the backends' own timeouts: mpidl's watchdog ends
    the job on every backend (the mpi backend has nothing else), naming the rank and its node."""
    try:
        args = demo_args(tmp_path, backend, "run", "log_every=2", "watchdog_s=5")
        r = srun(two_nodes, 1, pycode(FAULT_ON) + ["stuck", *args], timeout=240)
    finally:
        left = end_leftovers(two_nodes, tmp_path / "run")
    assert r.returncode == 4 and "finished" not in r.stdout, r.output[-3000:]  # srun returns the rank's 4
    waits = "the gradient allreduce (DDP, inside backward)" if backend == "ddp" else "the gradient allreduce of step 7"
    assert re.search(r"\[rank 1\] error: watchdog: rank 1 on node2 made no progress for \d+ s, in forward/backward "
                     rf"of step 7; rank 0 on node1 waits in {re.escape(waits)} \(watchdog_s 5\); ending the job "
                     r"\(exit 4\)", r.stderr), r.stderr[-3000:]
    assert not left


def restore_link(nodes, link: str) -> None:
    """Bring `link` back up and node2 back into service, for the tests after this one."""
    subprocess.run(["ip", "link", "set", link, "up"], check=True)
    state = ""
    for _ in range(120):
        state = run(["sinfo", "-h", "-n", "node2", "-o", "%T"], env=nodes.env).stdout.strip()
        if state == "idle":
            return
        if state.startswith("down"):  # SLURM saw it go silent: take it back (as an admin would)
            run(["scontrol", "update", "nodename=node2", "state=resume"], env=nodes.env)
        time.sleep(0.5)
    raise AssertionError(f"node2 did not come back: {state}")


CUT_OFF = {  # what notices a silent node, and the line it prints
    # mpirun's daemons, through the TCP keepalive `mpidl.net.launcher_env` sets (OpenMPI's own
    # default would take 8 minutes); shortened here to keep the test short (bench_faults times
    # mpidl's defaults), which launcher_env leaves alone as a user's own setting
    "mpirun": r"ORTE has lost communication with a remote daemon(.|\n)*on node node2",
    # slurmctld, after SlurmdTimeout (20 s on the emulated cluster)
    "srun": r"srun: error: Node failure on node2",
}
SHORT_KEEPALIVE = {"OMPI_MCA_oob_tcp_keepalive_time": "4", "OMPI_MCA_oob_tcp_keepalive_intvl": "2",
                   "OMPI_MCA_oob_tcp_keepalive_probes": "3"}


@needs_nodes
@pytest.mark.parametrize("backend,launcher", [("mpi", "mpirun"), ("ddp", "srun")])
def test_node_cut_off_the_network_ends_the_job(two_nodes, tmp_path, backend, launcher):
    """node2's link goes down mid-training: nothing is reset, its ranks just go silent, and every
    other rank waits in a collective until the launcher declares node2 lost."""
    link = next(what for kind, what in two_nodes.made if kind == "link" and what.endswith("v2"))
    p, run_dir = start_training(two_nodes, tmp_path, backend, launcher, per_node=1,
                                env=SHORT_KEEPALIVE if launcher == "mpirun" else {})
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        code, err = ended_within(p, 60)
    finally:
        end_leftovers(two_nodes, run_dir)   # node2's ranks never heard of it
        restore_link(two_nodes, link)
    assert code != 0
    assert re.search(CUT_OFF[launcher], err), err[-3000:]


# ------------------------------------------------------------------ the network's α/β, measured
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_allreduce  # noqa: E402

BENCH_ALLREDUCE = [PYTHON, str(ROOT / "benchmarks" / "bench_allreduce.py"), "--repeats", "1",
                   "--min-bytes", "256K", "--max-bytes", "1M"]


@pytest.mark.mpi  # mpirun started inside mpidl (or inside the batch job), out of the static look's sight
@needs_nodes
def test_bench_allreduce_across_nodes_fits_the_network(two_nodes, tmp_path):
    """1 node × 2 ranks and 2 nodes × 1 under `mpirun -H` with the launch agent: the JSON says where
    every rank ran and over which interface, fits shared memory and the network apart, and the
    model takes the network's α/β from it."""
    out = tmp_path / "ar.json"
    r = run([*BENCH_ALLREDUCE, "--backends", "mpi,torch", "--placements", "1x2,2x1", "--hosts", "node1,node2",
             "--launch-agent", AGENT, "--bind-to", "none", "--json", str(out)],
            env={**two_nodes.env, net.VAR: two_nodes.subnet}, timeout=300)
    assert r.returncode == 0, r.output[-4000:]
    doc = json.loads(out.read_text())
    one, two = doc["placements"]["1x2"], doc["placements"]["2x1"]
    assert (one["hosts"], one["ranks_per_node"], two["hosts"], two["ranks_per_node"]) == (
        ["node1"], 2, ["node1", "node2"], 1)
    assert two["launcher"] == "mpirun" and two["host_list_from"] == "--hosts" and two[net.VAR] == two_nodes.subnet
    assert two["one_machine"] and two["bind_to"] == "none"
    cores = f"0-{os.cpu_count() - 1}" if os.cpu_count() > 1 else "0"
    assert two["rank_cpus"] == [f"node1: {cores}", f"node2: {cores}"]
    assert one["links"]["mpi"] == "shared memory"
    assert two["links"] == {"mpi": "tcp between nodes, shared memory within: node1 mpidl0, node2 mpidl0",
                            "torch-gloo": "tcp (gloo): node1 mpidl0, node2 mpidl0"}
    assert set(doc["fits"]["mpi"]) == {"2"} and set(doc["inter_node_fits"]["mpi"]) == {"2x1"}
    for name in ("mpi", "torch-gloo"):  # each fit is of its own placement's medians
        for fits, label, key in ((doc["fits"], "1x2", "2"), (doc["inter_node_fits"], "2x1", "2x1")):
            rows = sorted((s for s in doc["summary"] if (s["backend"], s["placement"]) == (name, label)),
                          key=lambda s: s["bytes"])
            assert [s["bytes"] for s in rows] == [2**18, 2**19, 2**20]
            expect = bench_allreduce.fit([s["bytes"] for s in rows], [s["time_s"] for s in rows], 2)
            assert fits[name][key]["alpha_s"] == pytest.approx(expect["alpha_s"])
    assert "inter-node (the network between nodes), by placement:" in r.stdout and " 2x1: α = " in r.stdout
    f = doc["inter_node_fits"]["mpi"]["2x1"]
    p = run(mpidl_cmd("scale", "predict", "--mode", "weak", "--batch", "32", "--step-time", "0.1", "--params", "1e6",
                      "--ranks-per-node", "1", "--inter", f"measured:{out}", "--intra", "NVLink", "--sizes", "4",
                      "--json"))
    if not f["bandwidth_GBps"]:  # 3 sizes, one repeat, a busy machine: the fit may find no slope
        assert p.returncode == 2 and "no usable bandwidth (too noisy)" in p.stderr, p.output
        return
    assert p.returncode == 0, p.output
    row = json.loads(p.stdout)["rows"][0]
    assert row["allreduce_ring_s"] == pytest.approx(6 * f["alpha_s"] + 1.5 * 4e6 * f["beta_s_per_byte"])


@pytest.mark.mpi  # mpirun started inside mpidl (or inside the batch job), out of the static look's sight
@needs_nodes
def test_bench_allreduce_refuses_emulated_nodes_sharing_a_core(two_nodes, tmp_path):
    """mpirun's default binding on the emulated nodes: each node's daemon binds its rank to core 0,
    so both ranks take turns on one core; the benchmark stops instead of timing that."""
    r = run([*BENCH_ALLREDUCE, "--backends", "mpi", "--placements", "2x1", "--hosts", "node1,node2",
             "--launch-agent", AGENT, "--no-write", "--min-bytes", "4K", "--max-bytes", "8K"], env=two_nodes.env,
            timeout=300)
    assert r.returncode == 1, r.output[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "mpi on 2 nodes × 1: ranks on node1 and node2 share one machine and are bound to the same cores (0): "
        "they would take turns on them. Emulated nodes? Run with --bind-to none"), r.stderr[-3000:]


@needs_nodes
def test_bench_allreduce_under_srun(two_nodes, tmp_path):
    out = tmp_path / "ar.json"
    r = run([*BENCH_ALLREDUCE, "--backends", "mpi", "--placements", "2x1", "--launcher", "srun", "--json", str(out)],
            env=two_nodes.env, timeout=300)
    assert r.returncode == 0, r.output[-4000:]
    doc = json.loads(out.read_text())
    two = doc["placements"]["2x1"]
    assert (two["launcher"], two["hosts"], two[net.VAR]) == ("srun", ["node1", "node2"], None)
    assert two["command"].startswith("srun -K -N 2 --ntasks-per-node=1 --mpi=pmix ")
    # without MPIDL_NET: the interface each node routes to rank 0 through (never loopback)
    assert two["links"]["mpi"] == "tcp between nodes, shared memory within: node1 mpidl0, node2 mpidl0"
    assert doc["fits"] == {}
    assert set(doc["inter_node_fits"]["mpi"]) == {"2x1"}


# ------------------------------------------------------------------ a lost node does not end the work
def restart_slurmd(nodes, node: str) -> None:
    """Start `node`'s slurmd again (it re-registers: ReturnToService=2) and wait for it to be idle."""
    r = run(["bash", CLUSTER_SH, "exec", node, f"slurmd -f {nodes.env['SLURM_CONF']} -N {node}"], env=nodes.env)
    assert r.returncode == 0, r.output
    state = ""
    for _ in range(120):
        state = run(["sinfo", "-h", "-n", node, "-o", "%T"], env=nodes.env).stdout.strip()
        if state == "idle":
            return
        if state.startswith("down"):
            run(["scontrol", "update", f"nodename={node}", "state=resume"], env=nodes.env)
        time.sleep(0.5)
    raise AssertionError(f"{node} did not come back: {state}")


# The job's own transform (found beside its job file): each step of a 4-rank run sleeps, so the
# run on both nodes outlasts SLURM's noticing node2 (SlurmdTimeout) by far, whatever the load,
# while the 2-rank runs after it take a few epochs at full speed. The arithmetic is untouched.
PACE = """
import time
import mpidl


def four_ranks_slowly(x, y, seconds=0.5):
    if mpidl.current().size == 4:
        time.sleep(seconds)
    return x, y
"""
LOST_NODE_EPOCHS = 8


@needs_nodes
@pytest.mark.timeout(1200)
def test_a_lost_node_requeues_the_job_and_it_finishes_on_the_node_left(two_nodes, tmp_path):
    """`slurm.nodes: 1-2`: node2's slurmd dies mid-training; SLURM declares node2 down after
    SlurmdTimeout, ends the job and requeues it (`--requeue`); the requeued job starts on node1
    alone, resumes from its newest checkpoint (written every few seconds: checkpoint.every_minutes)
    at 2 ranks instead of 4, and finishes. Its final weights equal those of a run resumed by hand
    from the same checkpoint on as many ranks."""
    run_dir = tmp_path / "run"
    shutil.copy(ROOT / "jobs" / "demo.yaml", tmp_path / "job.yaml")
    (tmp_path / "pace.py").write_text(PACE)
    args = demo_args(tmp_path, "mpi", "run", f"epochs={LOST_NODE_EPOCHS}", "log_every=2",
                     "checkpoint.every_minutes=0.05", "checkpoint.keep=1000", "transform.name=pace:four_ranks_slowly")
    job, sets = str(tmp_path / "job.yaml"), args[1:]
    cmd = [*mpidl_cmd("submit", job, "--standalone", "--wait", "--nodes", "1-2", "--tasks-per-node", "2"),
           *[x for kv in sets for x in ("--set", kv)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=clean_env(two_nodes.env))
    pidfile = two_nodes.dir / "run" / "slurmd-node2.pid"
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 400
        while not (metrics.exists() and len(list((run_dir / "checkpoints").glob("ckpt-*.pt"))) >= 1
                   and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.3)
        assert {w for w in ("node1", "node2") if two_nodes.pids_on(w, str(run_dir))} == {"node1", "node2"}
        os.kill(int(pidfile.read_text()), signal.SIGKILL)  # node2's slurmd: SLURM no longer hears from node2
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        end_leftovers(two_nodes, run_dir)
        restart_slurmd(two_nodes, "node2")
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"\[mpidl\] job \d+ ended: COMPLETED, exit status 0, 1 restart\(s\)", out), out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"]["size"] == 2 and summary["world"]["local_size"] == 2 and summary["preempted"] is None
    resumed = Path(summary["resumed_from"])
    assert resumed.parent == run_dir / "checkpoints", summary["resumed_from"]
    # 3600 rows / (4 ranks × 32) = 28 steps an epoch before, 56 after: a checkpoint of the 4-rank run
    assert 0 < int(resumed.stem.split("-")[1]) < LOST_NODE_EPOCHS * 28
    assert summary["final"]["val_accuracy"] >= 0.8

    # by hand: the same checkpoint, 2 ranks on node1, into another folder
    hand = tmp_path / "hand"
    (hand / "checkpoints").mkdir(parents=True)
    shutil.copy(resumed, hand / "checkpoints" / resumed.name)
    hand_args = demo_args(tmp_path, "mpi", "hand", f"epochs={LOST_NODE_EPOCHS}", "log_every=2",
                          "checkpoint.keep=1000", "transform.name=pace:four_ranks_slowly")
    r = srun(two_nodes, 2, mpidl_cmd(*cli_args([job, *hand_args[1:]]), "--resume"), where=["node1"], timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    final = torch.load(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)["model"]
    by_hand = torch.load(sorted((hand / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)["model"]
    assert final.keys() == by_hand.keys()
    for k in final:
        assert torch.equal(final[k], by_hand[k]), k
