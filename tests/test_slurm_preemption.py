"""Preemption on the real local cluster: the warning signal mid-epoch -> checkpoint -> requeue ->
the job resumes by itself, and its final weights equal an uninterrupted run's, bit for bit.

The signal is sent as SLURM sends the `--signal` warning: `scancel --signal=USR2 JOB` reaches
every task of the job's steps (srun launcher); `scancel --batch --signal=USR2 JOB` reaches the
batch shell alone (`--signal=B:USR2@T`, the mpirun launcher), which must pass it on.
slurm/cluster.sh shortens SLURM's wait before a requeued job may start (cred_expire) and the
backfill interval, so the requeued job runs again within seconds.

The job's steps take milliseconds, so a signal sent "at step 20" could arrive after the last
step on a fast machine: the test stops the ranks (SIGSTOP) once step 20 is logged, sends the
signal, waits until every rank holds it pending, and lets them go on (SIGCONT). The signal
then lands mid-epoch however fast or loaded the machine is.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import PYTHON, ROOT, clean_env, mpidl_cmd, mpirun, run
from test_train import final_weights

# 5760 training rows / (2 ranks × 16) = 180 steps an epoch, 2 epochs; a signal after step 20
# lands mid-epoch, and the requeued job resumes from the checkpoint written at that signal
# (not from one of the every-50-steps checkpoints).
JOB = {
    "name": "pre", "seed": 5, "epochs": 2, "backend": "mpi", "log_every": 1,
    "data": {"batch": 16, "val_fraction": 0.1, "preprocess": {"flip": True},
             "synth": {"kind": "images", "rows": 6400, "classes": 4, "channels": 2, "size": 8, "noise": 60}},
    "model": {"name": "small_cnn", "args": {"width": 8}},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"kind": "cosine", "warmup_epochs": 0.3},
    "checkpoint": {"every_steps": 50, "every_epochs": 1},
    "slurm": {"tasks_per_node": 2, "time": "0:20:00"},
}
STEPS_PER_EPOCH = 180


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The job file and its data, and the final weights of the same job run uninterrupted."""
    d = tmp_path_factory.mktemp("preempt")
    job = d / "pre.yaml"
    job.write_text(yaml.safe_dump({**JOB, "data": {**JOB["data"], "files": str(d / "img.h5")},
                                   "output": str(d / "reference")}))
    r = mpirun(2, mpidl_cmd("train", str(job)), timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    return {"job": job, "reference": final_weights(d / "reference" / "checkpoints")}


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"step"') if metrics.exists() else 0


def _ranks(run_dir: Path, exclude: int) -> list[int]:
    """This machine's training processes of the job that writes run_dir (python, not mpirun or
    srun; not the test's own `mpidl submit` process)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == exclude:
            continue
        try:
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if Path(argv[0]).name.startswith("python") and "submit" not in argv and any(str(run_dir) in a for a in argv):
            found.append(int(d.name))
    return found


def _pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits, undelivered, at the (stopped) process."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.M)
    return any(int(m, 16) >> (signum - 1) & 1 for m in masks)


def _stopped(pid: int) -> bool:
    """Whether every thread of the process is stopped (the state field of /proc/PID/task/*/stat):
    a thread still running could take a process-directed signal."""
    return all(t.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
               for t in Path(f"/proc/{pid}/task").iterdir())


def _signal_ranks_at_step(run_dir: Path, step: int, exclude: int, alive, send) -> None:
    """Once `step` steps are logged: stop the ranks, `send()` the warning signal, wait until
    every rank holds SIGUSR2 pending, and let them continue."""
    deadline = time.monotonic() + 600
    while _steps_logged(run_dir) < step:
        assert alive() and time.monotonic() < deadline, "the job ended or stalled before step %d" % step
        time.sleep(0.01)
    ranks = _ranks(run_dir, exclude)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    try:
        # Only a rank that has really stopped keeps the warning signal pending: one that is still
        # runnable (a busy machine) would take SIGUSR2 before SIGSTOP, the lower number first.
        while not all(_stopped(pid) for pid in ranks):
            assert time.monotonic() < deadline, "the ranks did not stop"
            time.sleep(0.01)
        send()
        while not all(_pending(pid, signal.SIGUSR2) for pid in ranks):
            assert time.monotonic() < deadline, "SIGUSR2 did not reach every rank"
            time.sleep(0.02)
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)


def _signal_mid_run(proc: subprocess.Popen, run_dir: Path, env: dict, scancel_args: list[str]) -> str:
    """Once the job has logged step 20, send the warning signal as SLURM would; returns the job id."""
    job_id, lines = None, []
    while job_id is None:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(lines)
        lines.append(line)
        if line.startswith("submitted job "):
            job_id = line.split()[2]

    def scancel() -> None:
        r = run(["scancel", *scancel_args, "--signal=USR2", job_id], env=env)
        assert r.returncode == 0, r.output

    _signal_ranks_at_step(run_dir, 20, proc.pid, lambda: proc.poll() is None, scancel)
    return job_id


def _submit_and_preempt(shared, tmp_path, env, extra: list[str], scancel_args: list[str]) -> tuple[str, str]:
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "mpidl.cli", "submit", "--wait", str(shared["job"]), "--set", f"output={run_dir}", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=clean_env(env))
    job_id = None
    try:
        job_id = _signal_mid_run(proc, run_dir, env, scancel_args)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            if job_id is not None:
                run(["scancel", job_id], env=env)
    return job_id, out


def _check_resumed_exactly(shared, run_dir: Path, out: str) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted"] is None and summary["global_step"] == 2 * STEPS_PER_EPOCH, out[-3000:]
    stopped = re.search(r"preempted by SIGUSR2 at step (\d+) \(checkpoint written\): requeueing job", out)
    assert stopped, out[-3000:]
    resumed = int(Path(summary["resumed_from"]).stem.split("-")[1])
    assert resumed == int(stopped.group(1)) and 20 <= resumed < STEPS_PER_EPOCH, resumed  # mid-epoch
    final = final_weights(run_dir / "checkpoints")
    assert final.keys() == shared["reference"].keys()
    for k, v in shared["reference"].items():
        assert torch.equal(final[k], v), k


@pytest.mark.timeout(900)
def test_submitit_job_is_requeued_and_resumes_exactly(slurm_cluster, shared, tmp_path):
    job_id, out = _submit_and_preempt(shared, tmp_path, slurm_cluster, [], [])
    assert f"[mpidl] job {job_id} ended: COMPLETED, exit status 0, 1 restart(s)" in out, out[-3000:]
    # submitit's own "Requeued job" log line is not required: a run completed with its restart
    # while --wait had not shown that line (timing); the restart count above is SLURM's own
    _check_resumed_exactly(shared, tmp_path / "run", out)


@pytest.mark.timeout(900)
def test_standalone_mpirun_job_forwards_the_signal_and_resumes_exactly(slurm_cluster, shared, tmp_path):
    # --signal=B:USR2: only the batch shell is told; it passes the signal to mpirun, which
    # passes it to the ranks; rank 0 then runs `scontrol requeue`.
    job_id, out = _submit_and_preempt(shared, tmp_path, slurm_cluster,
                                      ["--standalone", "--set", "slurm.launcher=mpirun"], ["--batch"])
    assert f"[mpidl] job {job_id} ended: COMPLETED, exit status 0, 1 restart(s)" in out, out[-3000:]
    script = (tmp_path / "slurm" / "generated" / "pre.sbatch").read_text()
    assert "#SBATCH --signal=B:USR2@90" in script and "launch mpirun" in script
    _check_resumed_exactly(shared, tmp_path / "run", out)


@pytest.mark.timeout(900)
def test_requeue_limit_and_fingerprint_mismatch(shared, tmp_path):
    """The decisions after a preemption, under plain mpirun with the variables SLURM sets
    (SLURM_JOB_ID, SLURM_RESTART_COUNT): at the limit the job is not requeued and says how
    to continue; a requeued job whose spec changed refuses to resume in one line."""
    run_dir = tmp_path / "run"
    env = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}
    cmd = ["mpirun", "-np", "2", *mpidl_cmd("train", str(shared["job"]), "--requeue", "--set", f"output={run_dir}",
                                            "--set", "slurm.requeue_limit=1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=clean_env(env))
    try:
        # mpirun forwards SIGUSR2 to the ranks
        _signal_ranks_at_step(run_dir, 20, proc.pid, lambda: proc.poll() is None,
                              lambda: proc.send_signal(signal.SIGUSR2))
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out + err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "preempted by SIGUSR2" in lines[0], err
    assert "not requeued: slurm.requeue_limit = 1 reached (1 restarts); continue with --resume" in lines[0]
    assert json.loads((run_dir / "summary.json").read_text())["preempted"] == "SIGUSR2"

    # the requeued job, started again with another learning rate: one line, exit 2, no restart from zero
    r = mpirun(2, mpidl_cmd("train", str(shared["job"]), "--requeue", "--set", f"output={run_dir}",
                            "--set", "optimizer.lr=0.2"), env=env, timeout=300)
    assert r.returncode == 2, r.output[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "fingerprint" in errors[0], r.stderr


def test_a_job_restarted_more_often_than_its_requeue_limit_stops(shared, tmp_path):
    """SLURM requeues a job that lost a node by itself, without asking mpidl: a job started again
    more than slurm.requeue_limit times (preemptions and lost nodes together) stops at once with
    one line and exit 3, before it trains (under mpirun, with the variables SLURM would set)."""
    env = {"SLURM_JOB_ID": "4243", "SLURM_RESTART_COUNT": "2"}
    r = mpirun(2, mpidl_cmd("train", str(shared["job"]), "--requeue", "--set", f"output={tmp_path / 'run'}",
                            "--set", "slurm.requeue_limit=1"), env=env, timeout=300)
    assert r.returncode == 3, r.output[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert errors == ["error: job 4243 was restarted 2 times (preemptions, lost nodes), more than "
                      "slurm.requeue_limit = 1: not continuing; continue with --resume"], r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
