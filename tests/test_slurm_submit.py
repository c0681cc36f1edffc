"""`mpidl submit` against the real local cluster: submitit jobs, standalone scripts, arrays,
and every bad input as one line with exit 2."""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from conftest import PYTHON, ROOT, needs_horovod, pycode, run, sbatch_wait
from test_train import write_job

DEMO = str(ROOT / "jobs" / "demo.yaml")


def submit(*args: str, env: dict, cwd: Path, timeout: float = 900):
    return run([PYTHON, "-m", "mpidl.cli", "submit", *args], env=env, cwd=cwd, timeout=timeout)


def queued(env: dict) -> list[str]:
    return run(["squeue", "-h", "-o", "%i"], env=env).stdout.split()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> str:
    """One copy of the demo's synthetic images for the tests here (the first job writes it)."""
    return str(tmp_path_factory.mktemp("demo-data") / "demo.h5")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.timeout(900)  # a whole training job; slow when the machine is shared
def test_submit_wait_trains_the_demo(slurm_cluster, demo_data, tmp_path):
    # One epoch: submission is under test here; the demo's accuracy is test_train's
    r = submit("--wait", DEMO, "--set", f"data.files={demo_data}", "--set", f"output={tmp_path}/run",
               "--set", "epochs=1", "--set", "slurm.env.MPIDL_TEST_TOKEN=s3cr3t-t0ken", env=slurm_cluster, cwd=tmp_path)
    assert r.returncode == 0, r.output[-3000:]
    job_id = re.search(r"submitted job (\d+)", r.stdout).group(1)
    # slurm.env values (tokens) reach the ranks through the script alone: not the pickles or checkpoints
    holding = [p.name for p in (tmp_path / "run").rglob("*") if p.is_file() and b"s3cr3t-t0ken" in p.read_bytes()]
    assert all(name.endswith(".sh") and "submission" in name for name in holding) and holding, holding
    assert f"[mpidl] job {job_id} ended: COMPLETED, exit status 0, 0 restart(s)" in r.stdout
    assert "val_accuracy" in r.stdout  # rank 0's log was followed
    s = _summary(tmp_path / "run")
    assert s["world"]["size"] == 2 and s["world"]["launcher"] == "srun"
    assert s["epochs"] == 1 and s["final"]["val_accuracy"] > 0.3  # it learned: chance is 0.1
    assert (tmp_path / "run" / "slurm" / f"{job_id}_submission.sh").exists()
    assert (tmp_path / "run" / "slurm").stat().st_mode & 0o777 == 0o700  # the pickles: the owner's alone
    assert not (tmp_path / "run" / "mpidl.lock").exists()  # released at the end


@pytest.mark.timeout(900)  # a whole training job; slow when the machine is shared
def test_standalone_script_through_plain_sbatch(slurm_cluster, demo_data, tmp_path):
    r = submit("--dry-run", "--standalone", DEMO, "--set", f"data.files={demo_data}",
               "--set", f"output={tmp_path}/run", "--set", "epochs=1", env=slurm_cluster, cwd=tmp_path)
    assert r.returncode == 0, r.output
    path, answer = r.stdout.splitlines()
    assert path == "slurm/generated/demo.sbatch" and answer.startswith("sbatch --test-only: Job "), r.stdout
    script = (tmp_path / path).read_text()
    assert "#SBATCH --cpus-per-task=1" in script  # the node's 2 CPUs split between 2 ranks
    assert 'srun --mpi=pmix "$MPIDL" train ' in script and "submitit" not in script
    job_id, state = sbatch_wait(path, env=slurm_cluster, cwd=tmp_path, timeout=900)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED 0:0", state + "\n" + log[-3000:]
    assert log.rstrip().endswith("[mpidl] job step exit status 0 (restart 0)")
    s = _summary(tmp_path / "run")
    assert s["world"]["size"] == 2 and s["epochs"] == 1 and s["final"]["val_accuracy"] > 0.3


def _allreduce() -> tuple:
    import torch

    import mpidl
    import horovod.torch as hvd

    world = mpidl.init()
    hvd.init()
    total = hvd.allreduce(torch.tensor([world.rank + 1.0]), op=hvd.Sum, name="probe")
    return float(total), hvd.rank(), hvd.size(), world.launcher


@needs_horovod
def test_horovod_allreduce_under_submitit(slurm_cluster, tmp_path, monkeypatch):
    from mpidl.slurm import executor
    from mpidl.slurm.script import Plan
    from mpidl.spec import load_spec

    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the compute side cannot import tests/
    try:
        plan = Plan(load_spec(DEMO, ["slurm.time=5"]), DEMO, venv=sys.prefix)
        job = executor.make(plan, tmp_path / "slurm").submit(_allreduce)
        deadline = time.monotonic() + 300
        while not job.done() and time.monotonic() < deadline:
            time.sleep(1)
        results = job.results()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert sorted(results) == [(3.0, 0, 2, "srun"), (3.0, 1, 2, "srun")]


def _raise_in_rank1() -> str:
    import time

    import mpidl

    world = mpidl.init()
    if world.rank == 1:
        time.sleep(0.5)
        raise RuntimeError("boom from rank one")
    world.barrier()  # rank 0 waits here for a rank that never comes
    return "unreachable"


def test_exception_in_one_rank_ends_the_submitit_job(slurm_cluster, tmp_path, monkeypatch):
    # submitit catches the task's exception, pickles it and raises it again: mpidl's fail-fast
    # hook must still end every rank (a hang would run into the 5-minute limit: TIMEOUT).
    from mpidl.slurm import executor, watch
    from mpidl.slurm.script import Plan
    from mpidl.spec import load_spec

    for k, v in slurm_cluster.items():
        monkeypatch.setenv(k, v)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        plan = Plan(load_spec(DEMO, ["slurm.time=5"]), DEMO, venv=sys.prefix)
        sj = executor.make(plan, tmp_path / "slurm").submit(_raise_in_rank1)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    job = watch.Job(sj.job_id, tmp_path, [sj.paths.stdout, sj.paths.stderr], sj.paths.folder, f"{sj.job_id}_*_log.*")
    out, = watch.wait([job], poll_s=1, follow=False)
    assert out.state == "FAILED" and out.exit_code == 1, out
    assert out.error == "[rank 1] RuntimeError: boom from rank one", out
    assert not (tmp_path / "slurm" / f"{sj.job_id}_0_result.pkl").exists()  # rank 0 never got past the barrier


@pytest.mark.timeout(900)  # a whole training job; slow when the machine is shared
def test_array_gives_one_row_per_element(slurm_cluster, tmp_path):
    job = write_job(tmp_path, epochs=1, slurm={"tasks_per_node": 1})
    # the data first: two one-rank elements run at once on the two CPUs and would both write it
    r = run(pycode("import mpidl, sys; from mpidl.spec import load_spec; from mpidl.train.inputs import ensure_data;"
                   " ensure_data(load_spec(sys.argv[1]), mpidl.init())") + [str(job)])
    assert r.returncode == 0, r.output
    r = submit("--wait", str(job), "--array", "optimizer.lr=0.1,0.05,0.02", env=slurm_cluster, cwd=tmp_path)
    assert r.returncode == 0, r.output[-3000:]
    lines = r.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("job "))
    rows = lines[header + 1:header + 4]
    array = re.search(r"submitted array (\d+) \(3 elements\)", r.stdout).group(1)
    for i, (row, lr) in enumerate(zip(rows, ["0.1", "0.05", "0.02"])):
        cells = row.split()
        assert cells[:4] == [f"{array}_{i}", f"optimizer.lr={lr}", "COMPLETED", "0"], row
        run_dir = tmp_path / "run" / f"{i}-optimizer.lr={lr}"
        s = _summary(run_dir)
        assert f"{s['final']['val_accuracy']:.4f}" in cells  # each element's own final metrics
        assert (run_dir / "checkpoints").is_dir()


@pytest.mark.mpi  # mpirun started inside mpidl (or inside the batch job), out of the static look's sight
def test_submitit_with_the_mpirun_launcher(slurm_cluster, tmp_path):
    # mpirun's ranks all inherit SLURM_PROCID=0; each must still be its own submitit task
    job = write_job(tmp_path, steps=5, slurm={"tasks_per_node": 2, "launcher": "mpirun"})
    r = submit("--wait", str(job), env=slurm_cluster, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    job_id = re.search(r"submitted job (\d+)", r.stdout).group(1)
    results = [cloudpickle.loads((tmp_path / "run" / "slurm" / f"{job_id}_{t}_result.pkl").read_bytes())
               for t in (0, 1)]
    assert [(ok, s["world"]["rank"], s["world"]["launcher"], s["global_step"]) for ok, s in results] == \
        [("success", 0, "mpirun", 5), ("success", 1, "mpirun", 5)]


# ------------------------------------------------------------------ bad input

def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.mark.parametrize("override,expect", [
    ("slurm.time=25:99", 'slurm.time = "25:99": seconds must be below 60'),
    ("slurm.nodes=0", "slurm.nodes = 0: at least 1 node"),
    ("slurm.gpus_per_node=4", "slurm.gpus_per_node = 4: more GPUs than the 2 rank(s) per node"),
    ("slurm.partition=nope", 'slurm.partition = "nope": the controller refused the job (sbatch --test-only: '
                             "invalid partition specified: nope)"),
    ("slurm.tasks_per_node=3", "the controller refused the job (sbatch --test-only: "),  # 3 ranks, 2 CPUs
])
def test_bad_input_is_one_line_before_anything_is_submitted(slurm_cluster, tmp_path, override, expect):
    before = queued(slurm_cluster)
    extra = ["--set", "slurm.tasks_per_node=2"] if "gpus" in override else []
    r = submit(DEMO, *extra, "--set", override, "--set", f"output={tmp_path}/run", env=slurm_cluster, cwd=tmp_path)
    assert r.returncode == 2, r.output
    assert expect in _one_error_line(r)
    assert queued(slurm_cluster) == before and not (tmp_path / "run").exists()


def test_run_folder_with_checkpoints_is_refused_before_submitting(slurm_cluster, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "ckpt-000000010.pt").write_bytes(b"x")
    r = submit(DEMO, "--set", f"output={tmp_path}/run", env=slurm_cluster, cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run's checkpoints" in _one_error_line(r)


def test_a_run_folder_in_use_is_refused_before_submitting(slurm_cluster, tmp_path):
    import socket
    import subprocess

    holder = subprocess.Popen(["sleep", "120"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "mpidl.lock").write_text(json.dumps(
            {"job": None, "host": socket.gethostname(), "pid": holder.pid, "started": None, "since": "now"}))
        r = submit(DEMO, "--set", f"output={tmp_path}/run", env=slurm_cluster, cwd=tmp_path)
        assert r.returncode == 2 and f"in use by pid {holder.pid}" in _one_error_line(r)
    finally:
        holder.kill()
        holder.wait()


def test_submitit_folder_made_by_someone_else_is_refused(tmp_path):
    import os

    from mpidl.errors import BadInput
    from mpidl.slurm.submit import private_folder

    private_folder(tmp_path / "mine")
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o700
    (tmp_path / "theirs").mkdir(mode=0o777)
    if os.geteuid() == 0:
        os.chown(tmp_path / "theirs", 65534, 65534)
        with pytest.raises(BadInput, match="owned by uid 65534, not you"):
            private_folder(tmp_path / "theirs")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    with pytest.raises(BadInput, match="not a folder"):
        private_folder(tmp_path / "link")


def test_no_sbatch_on_path(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    r = submit(DEMO, env={"PATH": str(empty)}, cwd=tmp_path)
    assert r.returncode == 2
    assert _one_error_line(r).startswith("error: sbatch: not found on PATH")
    r = submit("--dry-run", DEMO, env={"PATH": str(empty)}, cwd=tmp_path)  # a dry run needs no SLURM
    assert r.returncode == 0 and "skipped (no SLURM controller answers here)" in r.stdout, r.output


def test_percent_in_the_run_folder_is_refused(tmp_path):
    """SLURM would expand it in the log paths (#SBATCH --output names the run folder)."""
    cwd = tmp_path / "a%jb"
    cwd.mkdir()
    empty = tmp_path / "bin"
    empty.mkdir()
    r = submit("--dry-run", DEMO, env={"PATH": str(empty)}, cwd=cwd)
    assert r.returncode == 2 and "/a%jb/runs/demo\": % is refused: SLURM expands it" in _one_error_line(r)
    assert list(cwd.iterdir()) == []  # no script, no run folder


def test_unreachable_controller(slurm_cluster, tmp_path):
    conf = tmp_path / "slurm.conf"
    text = Path(slurm_cluster["SLURM_CONF"]).read_text()
    conf.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=1", text))
    r = submit(DEMO, env={**slurm_cluster, "SLURM_CONF": str(conf)}, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "scontrol ping: the SLURM controller does not answer" in _one_error_line(r)


def test_missing_venv_on_the_compute_side(slurm_cluster, tmp_path):
    r = submit("--wait", DEMO, "--set", "slurm.venv=/nonexistent/venv", "--set", f"output={tmp_path}/run",
               env=slurm_cluster, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.output
    assert "error: slurm.venv: /nonexistent/venv/bin/python not found on " in r.stderr, r.output


@pytest.mark.timeout(900)  # a whole training job; slow when the machine is shared
def test_wait_reports_the_jobs_bad_input_and_a_failing_rank(slurm_cluster, demo_data, tmp_path):
    # the job's own bad input (its data file is missing): exit 2, rank 0's one-line error
    r = submit("--wait", DEMO, "--set", "data.synth=null", "--set", f"data.files={tmp_path}/none.h5",
               "--set", f"output={tmp_path}/a", env=slurm_cluster, cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.output
    assert re.search(r"^\[rank 0\] error: .*none\.h5", r.stderr, re.M), r.output
    # a rank that fails (the loss diverges at once): exit 1, that rank's error
    r = submit("--wait", DEMO, "--set", "optimizer.lr=1.0e+30", "--set", f"data.files={demo_data}",
               "--set", f"output={tmp_path}/b", env=slurm_cluster, cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.output
    assert re.search(r"^\[rank \d\] error: non-finite loss", r.stderr, re.M), r.output


# ------------------------------------------------------------------ pieces without a cluster

def test_array_variants_from_values_combinations_and_a_file(tmp_path):
    from mpidl.errors import BadInput
    from mpidl.slurm.submit import array_variants

    assert array_variants(["optimizer.lr=0.1,0.05"], "j.yaml") == [["optimizer.lr=0.1"], ["optimizer.lr=0.05"]]
    assert array_variants(["a=1,2", "b=x,y"], "j.yaml") == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"],
                                                           ["a=2", "b=y"]]
    f = tmp_path / "variants.txt"
    f.write_text("# lr and batch together\noptimizer.lr=0.1 data.batch=32\n\n'model.args={width: 16}'\n")
    assert array_variants([f"@{f}"], "j.yaml") == [["optimizer.lr=0.1", "data.batch=32"], ["model.args={width: 16}"]]
    assert array_variants([str(f)], "j.yaml") == array_variants([f"@{f}"], "j.yaml")
    for bad in (["lr"], ["=1,2"], ["a="], [f"@{tmp_path}/missing"]):
        with pytest.raises(BadInput):
            array_variants(bad, "j.yaml")


def test_failing_rank_error_and_final_state_come_from_the_logs(tmp_path):
    from mpidl.slurm.watch import Job, failing_error, outcome

    (tmp_path / "7_0_log.err").write_text(
        "submitit INFO (x) - Starting\n[rank 0] received SIGTERM, ending the job\n")
    (tmp_path / "7_1_log.err").write_text(
        "[rank 1] Traceback (most recent call last):\n[rank 1]   File \"x.py\", line 1, in <module>\n"
        "[rank 1] RuntimeError: boom from rank one\nsrun: error: vm: task 1: Exited with exit code 1\n")
    (tmp_path / "7_0_log.out").write_text("step 1\n[mpidl] job step exit status 255 (restart 0)\n"
                                          "step 9\n[mpidl] job step exit status 1 (restart 1)\n")
    logs = sorted(tmp_path.glob("7_*_log.*"))
    assert failing_error(logs) == "[rank 1] RuntimeError: boom from rank one"
    (tmp_path / "7_1_log.err").write_text("[rank 1] error: data.files: x.h5 not found\n")
    assert failing_error(sorted(tmp_path.glob("7_*_log.*"))) == "[rank 1] error: data.files: x.h5 not found"

    job = Job("7", tmp_path, [tmp_path / "7_0_log.out", tmp_path / "7_0_log.err"], tmp_path, "7_*_log.*")
    gone = outcome(job, None)  # the controller forgot the job: its own record decides
    assert (gone.state, gone.status, gone.restarts, gone.exit_code) == ("RECORDED", 1, 1, 1)
    known = outcome(job, {"JobState": "FAILED", "ExitCode": "2:0", "Restarts": "1"})
    assert (known.status, known.exit_code, known.error) == (2, 2, "[rank 1] error: data.files: x.h5 not found")
    done = outcome(job, {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "0"})
    assert (done.exit_code, done.error) == (0, None)
    cancelled = outcome(job, {"JobState": "CANCELLED", "ExitCode": "0:15", "Restarts": "2"})
    assert cancelled.exit_code == 1
