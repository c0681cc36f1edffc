"""Two emulated nodes on this machine (slurm/cluster.sh start --nodes 2): SLURM, mpirun, the three
backends, node-local staging, checkpoints and faults across nodes.

Each node is a network + UTS namespace with its own host name and address, linked to the other
and to the controller by a bridge. One cluster serves the session (`two_nodes`); it is stopped at
the end and nothing it made may be left. Needs root, iproute2 and SLURM; skips elsewhere.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from conftest import (CLUSTER_SH, MPIRUN, PYTHON, ROOT, clean_env, has_horovod, multinode_unavailable, mpidl_cmd,
                      pycode, run, start_nodes, stop_nodes)
from mpidl import net

BACKENDS = ["horovod", "ddp", "mpi"] if has_horovod() else ["ddp", "mpi"]
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


def mpirun_on_nodes(nodes, per_node: int, args: list[str], *, timeout: float = 300, env: dict | None = None):
    """`mpirun -H node1:k,node2:k` started here, its daemons entering the nodes through cluster.sh."""
    return run([MPIRUN, "-H", f"node1:{per_node},node2:{per_node}", "-np", str(2 * per_node),
                "--mca", "plm_rsh_agent", AGENT, *args],
               env={**nodes.env, **net.launcher_env({}), **(env or {})}, timeout=timeout)


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


@needs_nodes
def test_mpirun_inside_sbatch_across_nodes(two_nodes, tmp_path):
    out = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH -N 2 --ntasks-per-node=2 -o {shlex.quote(str(out))}\n"
        f"cd {shlex.quote(str(ROOT))}\n"
        f"mpirun {shlex.join(mpidl_cmd('info', '--json'))}\n")
    r = run(["sbatch", "--parsable", str(script)], env=two_nodes.env, timeout=60)
    assert r.returncode == 0, r.output
    job = r.stdout.strip().split(";")[0]
    for _ in range(480):  # sbatch --wait polls every few seconds; this is quicker
        state = run(["scontrol", "-o", "show", "job", job], env=two_nodes.env).stdout
        if "JobState=COMPLETED" in state and out.exists() and len(rows(out.read_text())) == 4:
            break
        assert "JobState=FAILED" not in state and "JobState=CANCELLED" not in state, state + out.read_text()
        time.sleep(0.5)
    got = rows(out.read_text())
    assert [(w["rank"], w["host"], w["local_rank"], w["local_size"], w["launcher"]) for w in got] == [
        (0, "node1", 0, 2, "mpirun"), (1, "node1", 1, 2, "mpirun"),
        (2, "node2", 0, 2, "mpirun"), (3, "node2", 1, 2, "mpirun")]


TRANSPORTS = """
import numpy as np, mpidl
from mpi4py import MPI
w = mpidl.init()
a = np.full(1 << 16, w.rank + 1.0)
w.comm.Allreduce(MPI.IN_PLACE, a)
assert (a == w.size * (w.size + 1) / 2).all()
print("SUM", w.rank, w.host, a[0], flush=True)
"""


@needs_nodes
def test_mpirun_with_namespace_agent_tcp_between_nodes_shared_memory_within(two_nodes):
    r = mpirun_on_nodes(two_nodes, 2, ["--mca", "btl_base_verbose", "30", *pycode(TRANSPORTS)], timeout=180)
    assert r.returncode == 0, r.output[-3000:]
    sums = sorted(line.split()[1:3] for line in r.stdout.splitlines() if line.startswith("SUM"))
    assert sums == [["0", "node1"], ["1", "node1"], ["2", "node2"], ["3", "node2"]]
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
# The demo job (jobs/demo.yaml) shrunk: 8×8 images, a narrower CNN, 3600 training rows.
SMALL_DEMO = ["data.synth.rows=4000", "data.synth.size=8", "data.synth.noise=100", "model.args.width=16",
              "data.batch=32", "epochs=5", "log_every=5"]

TRAIN = """
import hashlib, json, sys, mpidl
from mpidl.spec import load_spec
from mpidl.train.callbacks import Callback
from mpidl.train.trainer import train

class Capture(Callback):
    def on_end(self, trainer, summary):
        self.net = trainer.net

w = mpidl.init()
cap = Capture()
args = sys.argv[1:]
resume = "--resume" in args
train(load_spec(args[0], [a for a in args[1:] if a != "--resume"]), resume=resume, callbacks=[cap])
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in cap.net.parameters())).hexdigest()
seen = w.comm.gather((w.rank, w.host, w.local_rank, h), root=0)
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


def ranks_line(stdout: str) -> list:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RANKS "))[6:])


@needs_nodes
@pytest.mark.parametrize("per_node", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_trains_across_nodes(two_nodes, tmp_path, backend, per_node):
    stage = tmp_path / "stage"   # one folder both nodes see: each node's files are its own anyway
    extra = [f"data.stage_dir={stage}"] if per_node == 2 else []
    r = srun(two_nodes, per_node, pycode(TRAIN) + demo_args(tmp_path, backend, "run", *extra), timeout=400)
    assert r.returncode == 0, r.output[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final"]["val_accuracy"] >= 0.8, summary["final"]
    assert summary["world"]["size"] == 2 * per_node
    seen = ranks_line(r.stdout)
    assert [(rank, host) for rank, host, _, _ in seen] == [
        (i, "node1" if i < per_node else "node2") for i in range(2 * per_node)]
    assert len({h for *_, h in seen}) == 1, "parameters differ between ranks"
    # checkpoints: written by rank 0 alone, whole, into one folder
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts and all(name.startswith("ckpt-") and name.endswith(".pt") for name in ckpts), ckpts
    if per_node == 2:
        # staged once per node, by the node's local rank 0, one file for each rank on it
        staged = sorted(stage.glob("mpidl-stage-*.h5"))
        assert len(staged) == 4 and not list(stage.glob("*.tmp*"))
        by = {}
        for f in staged:
            with h5py.File(f, "r") as h:
                by[f.name.split("-r")[-1].split("of")[0]] = h.attrs["mpidl_staged_by"]
        assert by == {"0": "node1 rank 0", "1": "node1 rank 0", "2": "node2 rank 2", "3": "node2 rank 2"}


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
    assert [host for _, host, _, _ in seen] == ["node2", "node2"] and len({h for *_, h in seen}) == 1


# ------------------------------------------------------------------ faults across the nodes
def start_training(nodes, tmp_path: Path, backend: str, launcher: str) -> tuple[subprocess.Popen, Path]:
    """A long demo run across both nodes (2 ranks each), started in the background."""
    args = demo_args(tmp_path, backend, "run", "epochs=200", "log_every=2")
    if launcher == "srun":
        cmd = ["srun", "-K", "-N", "2", "--ntasks-per-node=2", "--mpi=pmix", *mpidl_cmd(*cli_args(args))]
        env = nodes.env
    else:
        cmd = [MPIRUN, "-H", "node1:2,node2:2", "-np", "4", "--mca", "plm_rsh_agent", AGENT, *mpidl_cmd(*cli_args(args))]
        env = {**nodes.env, **net.launcher_env({})}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(env), cwd=ROOT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:  # mid-training: a few records written
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.3)
    assert p.poll() is None, p.communicate()[1][-3000:]
    return p, tmp_path / "run"


def ended_within(p: subprocess.Popen, seconds: float) -> tuple[int, str]:
    """The job's exit status and stderr; a job still running after `seconds` is a hang: kill it, fail."""
    try:
        _, err = p.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        pytest.fail(f"the job was still running {seconds:.0f} s after the fault: {err[-2000:]}")
    return p.returncode, err


@needs_nodes
@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_node_ends_the_job(two_nodes, tmp_path, backend):
    p, run_dir = start_training(two_nodes, tmp_path, backend, "srun")
    victims = two_nodes.pids_on("node2", str(run_dir))
    assert len(victims) == 2, victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    code, err = ended_within(p, 60)
    assert code != 0
    assert "srun: error: node2: tasks 2-3: Killed" in err, err[-3000:]
    assert not two_nodes.pids_on("node1", str(run_dir)), "ranks left running on node1"


@needs_nodes
def test_exception_on_the_remote_node_shows_its_traceback_once(two_nodes, tmp_path):
    from test_train import FAULT

    fault = FAULT.replace("w.rank == 1", "w.rank == 3").replace("rank 1", "rank 3")
    args = demo_args(tmp_path, "ddp", "run")
    r = srun(two_nodes, 2, [PYTHON, "-c", fault.replace("load_spec(sys.argv[1])", "load_spec(sys.argv[1], sys.argv[2:])"),
                            *args], timeout=300)
    assert r.returncode != 0
    assert "finished" not in r.stdout
    assert r.stderr.count("[rank 3] RuntimeError: injected fault in rank 3 at step 7") == 1, r.stderr[-3000:]
    assert r.stderr.count("Traceback") == 1, r.stderr[-3000:]


def restore_link(nodes, link: str) -> None:
    """Bring `link` back up and node2 back into service, for the tests after this one."""
    subprocess.run(["ip", "link", "set", link, "up"], check=True)
    for _ in range(120):
        state = run(["sinfo", "-h", "-n", "node2", "-o", "%T"], env=nodes.env).stdout.strip()
        if state == "idle":
            return
        if state.startswith("down"):  # SLURM saw it go silent: take it back (as an admin would)
            run(["scontrol", "update", "nodename=node2", "state=resume"], env=nodes.env)
        time.sleep(0.5)
    raise AssertionError(f"node2 did not come back: {state}")


@needs_nodes
def test_node_cut_off_the_network_ends_the_job(two_nodes, tmp_path):
    """node2's link goes down mid-training: nothing is reset, its ranks just go silent, and every
    rank waits in a collective. mpirun's daemons notice through the TCP keepalive that
    `mpidl.net.launcher_env` sets (OpenMPI's own default would take 8 minutes). (Under srun,
    SLURM's SlurmdTimeout does it: see the README; not repeated here, to keep the suite short.)"""
    link = next(what for kind, what in two_nodes.made if kind == "link" and what.endswith("v2"))
    p, run_dir = start_training(two_nodes, tmp_path, "mpi", "mpirun")
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        code, err = ended_within(p, 60)
    finally:
        for pid in two_nodes.pids_on("node2", str(run_dir)):  # node2's ranks never heard of it
            os.kill(pid, signal.SIGKILL)
        restore_link(two_nodes, link)
    assert code != 0
    assert "ORTE has lost communication with a remote daemon" in err and "on node node2" in err, err[-3000:]
