"""One job at a time in a run folder: the lock, its holder, and taking over a stale one."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import mpidl_cmd, mpirun, run
from mpidl import runlock
from mpidl.errors import BadInput
from mpidl.runlock import Holder, RunLock
from test_train import write_job


def plant(folder, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"job": None, "host": socket.gethostname(), "pid": 1, "started": None, "since": "2026-01-01 00:00:00",
              **fields}
    (folder / runlock.NAME).write_text(json.dumps(holder))


@pytest.fixture
def other_process():
    """A live process of this host that is not this one."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def test_acquire_release_and_a_live_holder(tmp_path, other_process, monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = RunLock(tmp_path).acquire()
    holder = json.loads((tmp_path / runlock.NAME).read_text())
    assert holder["pid"] == lock.me.pid and holder["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / runlock.NAME).exists()

    pid = other_process.pid
    plant(tmp_path, pid=pid, started=runlock._start_time(pid))
    with pytest.raises(BadInput, match=rf"^{tmp_path}: in use by pid {pid} on .*remove {tmp_path}/mpidl.lock"):
        RunLock(tmp_path).acquire()
    with pytest.raises(BadInput, match="in use by"):
        runlock.check_free(tmp_path)

    # the holder ends: its lock is taken over, with a warning that says so
    other_process.kill()
    other_process.wait()
    runlock.check_free(tmp_path)
    with caplog.at_level("WARNING", logger="mpidl"):
        RunLock(tmp_path).acquire().release()
    assert f"taking over the lock of pid {pid}" in caplog.text and "its process has ended" in caplog.text


def test_a_reused_pid_is_not_the_holder(tmp_path, other_process, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    pid = other_process.pid
    plant(tmp_path, pid=pid, started=runlock._start_time(pid) - 1)  # the holder's pid, another process now
    assert runlock.gone(Holder(**json.loads((tmp_path / runlock.NAME).read_text())), Holder.me()) == \
        "its pid now belongs to another process"
    RunLock(tmp_path).acquire()


def test_holders_elsewhere(tmp_path, monkeypatch):
    # another host, no SLURM job to ask about: cannot be told from live
    plant(tmp_path, host="node-that-is-not-here", pid=4242)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(BadInput, match="in use by pid 4242 on node-that-is-not-here"):
        RunLock(tmp_path).acquire()
    # the same SLURM job (requeued onto another node): ours
    plant(tmp_path, host="node-that-is-not-here", pid=4242, job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    RunLock(tmp_path).acquire().release()
    # another SLURM job that squeue no longer knows: gone
    plant(tmp_path, host="node-that-is-not-here", pid=4242, job="778")
    monkeypatch.setattr(runlock, "_slurm_job_state", lambda job: "")
    RunLock(tmp_path).acquire().release()
    # ... and one that squeue says runs: live (this test's stand-in for squeue; a real one below)
    plant(tmp_path, host="node-that-is-not-here", pid=4242, job="779")
    monkeypatch.setattr(runlock, "_slurm_job_state", lambda job: "RUNNING")
    with pytest.raises(BadInput, match="in use by SLURM job 779, pid 4242"):
        RunLock(tmp_path).acquire()


def test_a_torn_lock_file_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / runlock.NAME).write_text("{")
    RunLock(tmp_path).acquire().release()


def test_two_jobs_on_one_run_folder(tmp_path):
    """A second `mpidl train` into a folder a live job trains in: one line, exit 2 on every rank, and
    the first job is unharmed (preempted afterwards, it checkpoints and leaves); then the lock is gone."""
    import signal

    from conftest import clean_env

    job = write_job(tmp_path, epochs=1000)  # far longer than this test waits
    first = subprocess.Popen(mpidl_cmd("train", str(job)), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=clean_env())
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "run").glob("metrics.jsonl")) and time.monotonic() < deadline:
            assert first.poll() is None
            time.sleep(0.2)
        r = mpirun(2, mpidl_cmd("train", str(job), "--overwrite"), timeout=120)
        assert r.returncode == 2, r.output[-2000:]
        assert r.stderr.count("in use by pid") == 1 and "Traceback" not in r.output, r.output[-2000:]
        first.send_signal(signal.SIGUSR2)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 3, out[-3000:]
    assert not (tmp_path / "run" / runlock.NAME).exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["preempted"] == "SIGUSR2" and list((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # one run's record, not two interleaved


def test_a_crashed_run_leaves_a_lock_the_next_takes_over(tmp_path):
    job = write_job(tmp_path, steps=5)
    plant(tmp_path / "run", pid=2**22 + 12345)  # a pid that is not running
    r = run(mpidl_cmd("train", str(job)), timeout=120)
    assert r.returncode == 0, r.output[-2000:]
    assert "taking over the lock of pid 4206649" in r.output and "its process has ended" in r.output
