"""Scaling studies across nodes: the `slurm` launcher (one `mpidl submit --wait` job per point) and
nodes as a placement (1 node × 2 ranks against 2 nodes × 1 rank), on the two emulated nodes of
`slurm/cluster.sh start --nodes 2`; the schema's refusals; the crossing-nodes arithmetic."""
from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, _free_port, mpidl_cmd, multinode_unavailable, run
from mpidl.scaling import efficiency
from mpidl.scaling.launch import SlurmLauncher
from mpidl.scaling.report import _fmt
from mpidl.scaling.runner import plan
from test_scaling import _job, _point, _refused, _study

needs_nodes = pytest.mark.skipif(multinode_unavailable() is not None, reason=str(multinode_unavailable()))
SLURM = {"name": "slurm", "nodes": [1, 2]}


# ---------------------------------------------------------------- placements, without a cluster

def test_plan_places_each_size_on_every_node_count_that_divides_it():
    order = plan([1, 2], ["mpi", "none"], 2, nodes=(1, 2))
    first, second = order[:6], order[6:]
    assert [(p.size, p.nodes, p.backend) for p in first] == [
        (1, 1, "mpi"), (1, 1, "none"), (2, 1, "mpi"), (2, 1, "none"), (2, 2, "mpi"), (2, 2, "none")]
    # the second repetition goes down in size and node count, backends rotated
    assert [(p.size, p.nodes, p.backend) for p in second] == [
        (2, 2, "none"), (2, 2, "mpi"), (2, 1, "none"), (2, 1, "mpi"), (1, 1, "none"), (1, 1, "mpi")]
    # one node keeps the run folders studies always had
    assert [p.key for p in first[2:5]] == ["p2-mpi-r0", "p2-none-r0", "p2-n2-mpi-r0"]


def test_slurm_job_is_the_trainers_job_submitted_with_the_placement(tmp_path, monkeypatch):
    launcher = SlurmLauncher("debug", threads_per_rank=1, timeout_s=300, cores=2)
    argv = ["/venv/bin/mpidl", "train", "jobs/demo.yaml", "--set", "backend=mpi", "--set", 'output="runs/x"']
    assert launcher.submission(4, 2, argv) == ("jobs/demo.yaml", [
        "backend=mpi", 'output="runs/x"', "slurm.nodes=2", "slurm.tasks_per_node=2", "slurm.launcher=srun",
        "slurm.time=7", "slurm.requeue_limit=0", "slurm.cpus_per_task=1", 'slurm.partition="debug"'])
    # the job the submit API is given: the spec with the study's items and the placement applied
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mpidl.slurm.controller.controller_answers", lambda: False)
    job = _job(tmp_path)
    prepared, runs = launcher.prepare(4, 2, ["mpidl", "train", str(job), "--set", "backend=mpi"], cwd=tmp_path)
    s = prepared.plans[0].spec
    assert runs is None and s.backend == "mpi"
    assert (s.slurm.nodes, s.slurm.tasks_per_node, s.slurm.launcher, s.slurm.time, s.slurm.requeue_limit,
            s.slurm.partition) == (2, 2, "srun", "7", 0, "debug")
    # a study's own command: `mpidl submit -- CMD`, its logs in the point's folder
    prepared, runs = launcher.prepare(2, 1, ["python", "train.py"], cwd=tmp_path, output=tmp_path / "p2")
    assert [words for _, words in runs] == [["python", "train.py"]] and prepared.run_dir == tmp_path / "p2"


def test_a_gpu_jobs_points_ask_one_gpu_a_rank(tmp_path, monkeypatch):
    # jobs/gpu-resnet50.yaml asks 4 GPUs a node; a study's points at 1 and 2 ranks a node were
    # refused ("more GPUs than the 1 rank(s) per node") until each point asked one GPU a rank
    from mpidl.scaling.launch import make_launcher
    from mpidl.scaling.study import load_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mpidl.slurm.controller.controller_answers", lambda: False)
    study = load_study(_study(tmp_path, _job(tmp_path), launcher=SLURM, sizes=[1, 2, 4],
                              set=["slurm.gpus_per_node=4"]))
    launcher = make_launcher(study, cores=2)
    for ranks, nodes in [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]:
        assert f"slurm.gpus_per_node={ranks // nodes}" in launcher.placement(ranks, nodes)
        prepared, _ = launcher.prepare(ranks, nodes, ["mpidl", "train", str(study.job_path), "--set",
                                                      "slurm.gpus_per_node=4"], cwd=tmp_path)
        s = prepared.plans[0].spec.slurm
        assert (s.nodes, s.tasks_per_node, s.gpus_per_node) == (nodes, ranks // nodes, ranks // nodes)
        assert f"#SBATCH --gpus-per-node={ranks // nodes}" in prepared.text
    # a CPU job's points ask for none
    cpu = make_launcher(load_study(_study(tmp_path, _job(tmp_path), launcher=SLURM)), cores=2)
    assert not any(item.startswith("slurm.gpus_per_node") for item in cpu.placement(2, 1))


@pytest.mark.slurm
def test_a_gpu_study_dry_run_on_the_local_cluster(slurm_cluster, tmp_path):
    """jobs/gpu-resnet50.yaml's study, each placement judged by the controller (sbatch --test-only)
    and nothing run. The cluster's node has 2 emulated GPUs (GRES counts, no devices: this machine
    has no GPU), so the job is shrunk to a 2-GPU, 2-core node with `set` items."""
    def dry_run(nodes: list[int]):
        study = tmp_path / "study.yaml"
        study.write_text(yaml.safe_dump({
            "name": "gpu", "job": str(ROOT / "jobs" / "gpu-resnet50.yaml"), "mode": "weak", "sizes": [1, 2],
            "set": ["data.val_fraction=0", "slurm.gpus_per_node=2", "slurm.cpus_per_node=2",
                    f"data.files={tmp_path / 'none.h5'}"],
            "batch_per_rank": 256, "warmup_steps": 2, "steps": 4, "window": 2, "repetitions": 1,
            "backends": ["horovod", "ddp"], "launcher": {"name": "slurm", "nodes": nodes},
            "output": str(tmp_path / "out")}))
        return run(mpidl_cmd("scale", str(study), "--dry-run"), env=slurm_cluster, timeout=300)

    r = dry_run([1])
    assert r.returncode == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("study gpu: 2 placement(s) checked by slurm, nothing run"), r.stdout
    for ranks, line in zip((1, 2), lines[1:]):
        assert line.startswith(f"  {ranks} rank(s) on 1 node(s): "), line
        assert f"--gpus-per-node={ranks} " in line and f"--ntasks-per-node={ranks} " in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "none.h5").exists()
    # the cluster has one node: 2 ranks on 2 nodes is the controller's refusal, one line, exit 2
    r = dry_run([1, 2])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == "", r.output
    assert "launcher.nodes: 2 ranks on 2 node(s): " in r.stderr, r.stderr


def test_crossing_nodes_on_known_timings():
    # weak, 64 samples per rank: X = p·64 / T. The baseline at each placement is its own reference.
    pts = {("mpi", 1, 1): _point(6400, 0.010), ("mpi", 2, 1): _point(128 / 0.0125, 0.0125),
           ("mpi", 2, 2): _point(128 / 0.016, 0.016), ("none", 1, 1): _point(6400, 0.010),
           ("none", 2, 1): _point(128 / 0.011, 0.011), ("none", 2, 2): _point(128 / 0.010, 0.010)}
    rows = {(r["backend"], r["size"], r["nodes"]): r for r in efficiency.table(pts, "weak")}
    r = rows[("mpi", 2, 2)]
    assert r["ranks_per_node"] == 1
    assert r["efficiency"] == pytest.approx(0.010 / 0.016)          # still against the 1-rank point
    assert r["comm_share"] == pytest.approx(1 - 0.010 / 0.016)      # the baseline at 2 ranks on 2 nodes
    assert r["machine_limit"] == pytest.approx(0.010 / 0.010)       # L(2, 2)
    assert rows[("mpi", 2, 1)]["comm_share"] == pytest.approx(1 - 0.011 / 0.0125)
    cross = {(c["backend"], c["size"], c["nodes"]): c for c in efficiency.crossing(list(rows.values()))}
    assert set(cross) == {("mpi", 2, 2), ("none", 2, 2)}
    c = cross[("mpi", 2, 2)]
    assert c["ratio"] == pytest.approx(0.0125 / 0.016)                          # X(2,2) / X(2,1)
    assert c["exposed_one_node"] == pytest.approx(0.0015) and c["exposed"] == pytest.approx(0.006)
    assert c["crossing_cost"] == pytest.approx(0.0045)                          # ΔC = C(2,2) − C(2,1)
    assert cross[("none", 2, 2)]["ratio"] == pytest.approx(1.1) and cross[("none", 2, 2)]["crossing_cost"] is None
    # the single-node model sees the one-node points only
    one = efficiency.on_one_node({"table": list(rows.values()), "points": []})
    assert {(r["backend"], r["size"]) for r in one["table"]} == {(b, p) for b in ("mpi", "none") for p in (1, 2)}


# ---------------------------------------------------------------- bad studies: one line, exit 2, nothing written

@pytest.mark.parametrize("over,expect", [
    ({"launcher": {"name": "slurm", "nodes": [0, 1]}}, "launcher.nodes = [0, 1]: node counts are >= 1"),
    ({"launcher": {"name": "slurm", "nodes": [1, 1]}}, "launcher.nodes = [1, 1]: each node count once"),
    ({"launcher": {"nodes": [1, 2]}}, "launcher.nodes = [1, 2]: more than one node needs name: slurm"),
    ({"launcher": {"name": "slurm", "args": ["-v"]}}, "launcher.args = ['-v']: args are mpirun's; the slurm launcher"),
    ({"launcher": {"partition": "debug"}}, 'launcher.partition = "debug": partition is for name: slurm'),
    ({"sizes": [2, 3], "launcher": {"name": "slurm", "nodes": [2]}},
     "sizes: 3 ranks cannot be spread evenly over any of launcher.nodes [2]"),
    ({"sizes": [1, 2], "launcher": {"name": "slurm", "nodes": [1, 4]}},
     "launcher.nodes: 4 nodes divide none of the sizes [1, 2]"),
])
def test_bad_placement_is_refused(tmp_path, over, expect):
    study = _study(tmp_path, _job(tmp_path), **over)
    _refused(tmp_path, study, f"{study}: {expect}")


def test_slurm_launcher_without_a_controller_is_refused(tmp_path):
    # a configuration whose controller is not running (where SLURM is not installed at all, the
    # refusal names the missing client command instead)
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=nowhere\nSlurmctldHost=localhost\nSlurmctldPort={_free_port()}\n"
                    "AuthType=auth/munge\nNodeName=x CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=x Default=YES\n")
    study = _study(tmp_path, _job(tmp_path), launcher=SLURM, sizes=[2])
    r = run(mpidl_cmd("scale", str(study)), env={"SLURM_CONF": str(conf)}, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith(f"error: {study}: launcher.name = 'slurm': "), r.stderr
    assert "the SLURM controller does not answer" in r.stderr or "not found on PATH" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a tiny real study on the two nodes

def _medians(run_dir: Path, warmup: int) -> tuple[float, float]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [x for x in recs if "step_time" in x and x["step"] > warmup]
    assert len(measured) == 2
    return (statistics.median(x["samples_per_s"] for x in measured),
            statistics.median(x["step_time"] for x in measured))


@needs_nodes
@pytest.mark.timeout(600)
def test_study_through_slurm_on_one_and_two_nodes(two_nodes, tmp_path):
    """2 ranks on 1 node and on 2 nodes, mpi and the baseline: four SLURM jobs, then the report."""
    study = _study(tmp_path, _job(tmp_path), sizes=[2], backends=["mpi"], launcher=SLURM, timeout_s=300)
    env = {**two_nodes.env, "MPIDL_NET": two_nodes.subnet}
    r = run(mpidl_cmd("scale", str(study)), env=env, timeout=500)
    assert r.returncode == 0, r.output[-4000:]
    out = tmp_path / "out"
    doc = json.loads((out / "study.json").read_text())
    assert doc["complete"] and doc["failed_runs"] == 0
    assert sorted(x["run_dir"] for x in doc["runs"]) == [
        "runs/p2-mpi-r0", "runs/p2-n2-mpi-r0", "runs/p2-n2-none-r0", "runs/p2-none-r0"]
    launcher = doc["environment"]["launcher"]
    assert launcher["name"] == "slurm" and launcher["nodes"] == ["node1", "node2"]
    assert launcher["partition"] == "debug" and launcher["version"].startswith("slurm")
    for x in doc["runs"]:
        run_dir = out / x["run_dir"]
        world = json.loads((run_dir / "summary.json").read_text())["world"]
        # placed as asked, by srun: rank 0's node holds 2 / nodes ranks
        assert (world["launcher"], world["local_size"]) == ("srun", 2 // x["nodes"]), (x["run_dir"], world)
        assert "[mpidl] job " in (run_dir / "output.log").read_text()  # mpidl submit --wait's account
        assert not (run_dir / "slurm").exists() and not (run_dir / "checkpoints").exists()
        assert (x["throughput"], x["step_time"]) == pytest.approx(_medians(run_dir, 2))
    table = {(t["backend"], t["size"], t["nodes"]): t for t in doc["table"]}
    assert set(table) == {(b, 2, n) for b in ("mpi", "none") for n in (1, 2)}
    for n in (1, 2):  # the baseline at the same size and placement
        assert table[("mpi", 2, n)]["comm_share"] == pytest.approx(
            1 - table[("none", 2, n)]["step_time"] / table[("mpi", 2, n)]["step_time"])
    cross = {c["backend"]: c for c in doc["crossing"]}
    c = cross["mpi"]
    assert c["ratio"] == pytest.approx(table[("mpi", 2, 2)]["throughput"] / table[("mpi", 2, 1)]["throughput"])
    exposed = {n: table[("mpi", 2, n)]["step_time"] - table[("none", 2, n)]["step_time"] for n in (1, 2)}
    assert c["crossing_cost"] == pytest.approx(exposed[2] - exposed[1])

    rep = run(mpidl_cmd("report", str(out)), timeout=300)
    assert rep.returncode == 0, rep.output[-3000:]
    with open(out / "crossing.csv") as f:
        rows = {r["backend"]: r for r in csv.DictReader(f)}
    assert float(rows["mpi"]["ratio"]) == pytest.approx(c["ratio"])
    assert float(rows["mpi"]["crossing_cost"]) == pytest.approx(c["crossing_cost"])
    with open(out / "points.csv") as f:
        assert {(r["backend"], r["nodes"], r["ranks_per_node"]) for r in csv.DictReader(f)} == {
            (b, n, k) for b in ("mpi", "none") for n, k in (("1", "2"), ("2", "1"))}
    md = (out / "report.md").read_text()
    assert "## Crossing nodes: p ranks on n nodes against the same p on one node" in md
    assert f"| mpi | 2 | 2 × 1 | {_fmt(c['throughput_one_node'])} | {_fmt(c['throughput'])} | {_fmt(c['ratio'])} |" in md
    assert "ΔC(p, n) = C(p, n) − C(p, 1)" in md and "slurm (slurm" in md


def test_committed_studies_load(monkeypatch):
    from conftest import ROOT
    from mpidl.scaling.study import load_study

    monkeypatch.chdir(ROOT)  # a study names its job from the repo root
    studies = sorted((ROOT / "benchmarks" / "studies").glob("*.yaml"))
    assert "two-nodes.yaml" in {p.name for p in studies}
    for path in studies:
        spec = load_study(path).spec
        assert spec.output.format(name=spec.name) == f"benchmarks/results/{path.stem}", path
    two = load_study(ROOT / "benchmarks" / "studies" / "two-nodes.yaml").spec
    assert two.launcher.name == "slurm" and [two.node_counts(p) for p in two.sizes] == [[1], [1, 2]]


def failing(folder: Path, command: str, times: int) -> Path:
    """`command` first on PATH, answering as a controller too busy to (exit 1) the first `times`
    calls, then running the real one: a fault the real one-node cluster does not make on demand."""
    real = subprocess.run(["bash", "-c", f"command -v {command}"], capture_output=True, text=True).stdout.strip()
    folder.mkdir(exist_ok=True)
    shim = folder / command
    shim.write_text(f"""#!/bin/sh
n=$(cat "{folder}/{command}.calls" 2>/dev/null || echo 0); echo $((n + 1)) > "{folder}/{command}.calls"
if [ "$n" -lt {times} ]; then echo "{command}: error: Socket timed out on send/recv operation" >&2; exit 1; fi
exec "{real}" "$@"
""")
    shim.chmod(0o755)
    return folder


@pytest.mark.timeout(300)
def test_slurm_point_past_its_timeout_is_cancelled(slurm_cluster, tmp_path, monkeypatch):
    """The launcher keeps the job it submitted: past the study's timeout it cancels it and says so,
    asking again when the controller does not answer the first time."""
    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    shims = failing(tmp_path / "bin", "scancel", times=1)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    launcher = SlurmLauncher(None, threads_per_rank=0, timeout_s=60, cores=2)
    log = tmp_path / "p1" / "output.log"
    log.parent.mkdir()
    done = launcher.run(1, ["sleep", "600"], nodes=1, env=dict(os.environ), cwd=tmp_path, timeout=20, log=log)
    text = log.read_text()
    assert done.timed_out and done.returncode == 1, text
    job = re.search(r"^submitted job (\d+)", text, re.M).group(1)
    assert f"[mpidl] job {job}: cancelled by the study" in text and f"job {job} ended: CANCELLED" in text, text
    left = subprocess.run(["squeue", "-h", "-j", job, "-o", "%t"], capture_output=True, text=True)
    assert not left.stdout.strip(), left.stdout
    assert (shims / "scancel.calls").read_text().strip() == "2" and "scancel failed" not in text, text


def test_a_cancel_the_controller_never_answers_is_not_called_done(slurm_cluster, tmp_path, monkeypatch):
    """scancel fails every time (and squeue too): the log says so and does not say the job was
    cancelled, nor that it ended."""
    from mpidl.scaling.launch import _cancel
    from mpidl.slurm.watch import Job

    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    r = run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", "sleep 600"], env=dict(os.environ))
    job = r.stdout.strip().split(";")[0]
    assert r.returncode == 0 and job, r.output
    try:
        monkeypatch.setenv("PATH", f"{failing(tmp_path / 'bin', 'scancel', times=99)}:{os.environ['PATH']}")
        expected = f"[mpidl] job {job}: scancel failed 2 times: scancel: error: Socket timed out on send/recv operation\n"
        out = tmp_path / "log"
        with open(out, "w") as f:
            _cancel([Job(job, tmp_path, [], tmp_path, "")], f, tries=2)
        assert out.read_text() == expected
        failing(tmp_path / "bin", "squeue", times=99)  # nor does it answer squeue: the job may still be there
        with open(out, "w") as f:
            _cancel([Job(job, tmp_path, [], tmp_path, "")], f, tries=2)
        assert out.read_text() == expected
    finally:
        monkeypatch.undo()
        subprocess.run(["scancel", job], env={**os.environ, **slurm_cluster})
