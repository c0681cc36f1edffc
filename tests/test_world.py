"""The World: rank detection (pure and under real launchers), `mpidl info`, fail-fast."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import MPIRUN, clean_env, mpidl_cmd, mpirun, needs_horovod, pycode, results, run
from mpidl.world import GPU_DRIVER_PATHS, MPIRUN as L_MPIRUN, SINGLE, SRUN, detect_launcher, env_rank


# ---------------------------------------------------------------- pure detection
def test_single_process_environment():
    assert detect_launcher({}) == SINGLE
    assert env_rank({}) == (0, 1, 0, 1)


def test_mpirun_environment():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "PMIX_RANK": "2"}
    assert detect_launcher(env) == L_MPIRUN
    assert env_rank(env) == (2, 3, 0, 1)


def test_mpirun_inside_sbatch_ignores_stale_slurm_procid():
    # Every rank of mpirun inside an sbatch script inherits SLURM_PROCID=0 and no SLURM_STEP_ID.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
           "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert detect_launcher(env) == L_MPIRUN
    assert env_rank(env) == (1, 2, 1, 2)


def test_srun_pmix_environment():
    # srun --mpi=pmix sets SLURM_* and PMIX_RANK but no OMPI_COMM_WORLD_*.
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_TASKS_PER_NODE": "2(x2)", "PMIX_RANK": "3"}
    assert detect_launcher(env) == SRUN
    assert env_rank(env) == (3, 4, 1, 2)


def test_sbatch_batch_script_without_step_is_single():
    assert detect_launcher({"SLURM_PROCID": "0", "SLURM_JOB_ID": "9", "SLURM_NTASKS": "4"}) == SINGLE
    assert env_rank({"SLURM_PROCID": "0", "SLURM_JOB_ID": "9", "SLURM_NTASKS": "4"}) == (0, 1, 0, 1)


# ---------------------------------------------------------------- the device
def test_device_without_a_gpu_driver_is_cpu_and_torch_stays_unimported():
    # a CPU machine (this one, CI): init() answers without the seconds torch takes to import
    if any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        pytest.skip("a GPU driver is here")
    code = "import sys, mpidl.world as w; print(w.init().device, 'torch' in sys.modules)"
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0, r.output
    assert r.stdout.split() == ["cpu", "False"]


def test_device_with_a_gpu_driver_is_asked_of_torch(monkeypatch, tmp_path):
    import torch

    from mpidl import world

    monkeypatch.setattr(world, "GPU_DRIVER_PATHS", (str(tmp_path),))  # a driver's path exists
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [world.pick_device(r) for r in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert world.pick_device(0) == "cpu"


# ---------------------------------------------------------------- real launches
def test_info_single_process():
    r = run(mpidl_cmd("info", "--json"))
    assert r.returncode == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["rank"], row["size"], row["local_rank"], row["local_size"]) == (0, 1, 0, 1)
    assert row["launcher"] == "single" and row["device"] == "cpu" and row["host"]


@pytest.mark.parametrize("np_", [2, 3])
def test_info_under_mpirun(np_):
    r = mpirun(np_, mpidl_cmd("info", "--json"))
    assert r.returncode == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["rank"] for row in rows] == list(range(np_))
    for row in rows:
        assert set(row) >= {"rank", "size", "local_rank", "local_size", "host", "device", "launcher"}
        assert row["size"] == np_ and row["local_size"] == np_ and row["launcher"] == "mpirun"
    assert sorted(row["local_rank"] for row in rows) == list(range(np_))


def test_only_rank0_prints_info_lines():
    r = mpirun(2, mpidl_cmd("info"))
    assert r.returncode == 0, r.output
    assert len([line for line in r.stdout.splitlines() if line.startswith("rank=")]) == 2
    assert r.stderr.strip() == ""


# ---------------------------------------------------------------- fail fast
RAISE_IN_RANK1 = """
import time, mpidl
w = mpidl.init()
if w.rank == 1:
    time.sleep(0.5)
    raise RuntimeError("boom from rank one")
w.barrier()   # rank 0 waits here for a rank that will never come
print("unreachable", flush=True)
"""


@pytest.mark.parametrize("np_", [2, 3])
def test_exception_in_one_rank_ends_job(np_):
    # A hang would run into the timeout and fail the test; the 10 s figure is measured in the note.
    r = mpirun(np_, pycode(RAISE_IN_RANK1), timeout=60)
    assert r.returncode != 0
    assert "unreachable" not in r.stdout
    assert "[rank 1] RuntimeError: boom from rank one" in r.stderr
    assert r.stderr.count("boom from rank one") == 1 + r.stderr.count('raise RuntimeError("boom from rank one")')
    assert "[rank 1] Traceback" in r.stderr


BAD_INPUT_EVERYWHERE = """
import mpidl
w = mpidl.init()
def check():
    raise mpidl.BadInput("data.h5: dataset 'x' not found (have: 'images', 'labels')")
w.agree(check)
"""


# Rank 1's collective fails because a peer is gone (Gloo's words), a moment before rank 0 raises the
# job's real error; or it fails so with no other error behind it.
ECHO = """
import sys, time, mpidl
w = mpidl.init()
if w.rank == 1:
    raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.1.0.3]:4321")
if sys.argv[1] == "first-error":
    time.sleep(0.5)
    raise RuntimeError("the job's first error")
time.sleep(30)
"""


def test_a_rank_failing_because_a_peer_died_leaves_the_first_error_alone():
    r = mpirun(2, pycode(ECHO) + ["first-error"], timeout=60)
    assert r.returncode != 0
    assert r.stderr.count("Traceback") == 1 and "[rank 0] RuntimeError: the job's first error" in r.stderr, r.stderr
    assert "Connection closed by peer" not in r.stderr, r.stderr
    # no other error comes: the lost peer is reported after the wait, and the job ends
    r = mpirun(2, pycode(ECHO) + ["alone"], timeout=60)
    assert r.returncode != 0 and r.stderr.count("Traceback") == 1, r.stderr
    assert "[rank 1] RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer" in r.stderr, r.stderr


def test_bad_input_exits_2_with_one_line():
    r = mpirun(3, mpidl_cmd_code(BAD_INPUT_EVERYWHERE), timeout=60)
    assert r.returncode == 2, r.output
    errors = [line for line in r.stderr.splitlines() if "dataset 'x' not found" in line]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr


BAD_INPUT_ONE_RANK = """
import mpidl
w = mpidl.init()
def check():
    if w.rank == 2:
        raise mpidl.BadInput("shard.h5: truncated file")
w.agree(check)
print("unreachable", flush=True)
"""


def test_bad_input_on_one_rank_is_agreed_by_all():
    r = mpirun(3, mpidl_cmd_code(BAD_INPUT_ONE_RANK), timeout=60)
    assert r.returncode == 2, r.output
    assert "unreachable" not in r.stdout
    assert "[rank 2] error: shard.h5: truncated file" in r.stderr


def mpidl_cmd_code(code: str) -> list[str]:
    # BadInput reaches the CLI's handler in real use; a script gets the same from the excepthook.
    return pycode(code)


HANG_FOREVER = """
import os, pathlib, sys, time, mpidl
w = mpidl.init()
# written whole, then named: the test reads a ready file the moment it appears
ready = pathlib.Path(sys.argv[1]) / f"ready-{w.rank}"
partial = ready.with_name(f".{ready.name}")
partial.write_text(str(os.getpid()))
os.replace(partial, ready)
if w.rank == 0:
    time.sleep(600)
w.barrier()
"""


def test_sigterm_to_mpirun_ends_all_ranks(tmp_path):
    """The ranks say they are ready in files, not on stdout: a read of mpirun's output would wait
    for as long as the output takes to come (once under load: minutes, past every deadline)."""
    if MPIRUN is None:
        pytest.skip("mpirun not installed")
    with open(tmp_path / "output", "w") as out:
        p = subprocess.Popen([MPIRUN, "-np", "2", *pycode(HANG_FOREVER), str(tmp_path)], stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=clean_env())
    ready = lambda: sorted(tmp_path.glob("ready-*"))  # noqa: E731
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(ready()) < 2 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(ready()) == 2, (tmp_path / "output").read_text()[-3000:]
        pids = [int(f.read_text()) for f in ready()]
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("mpirun still running 60 s after SIGTERM")
        assert p.returncode != 0
        deadline = time.monotonic() + 30  # and every rank ended with it
        while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")], "ranks outlived mpirun's SIGTERM"
    finally:  # a failure leaves nothing running: mpirun, nor the ranks it would orphan
        if p.poll() is None:
            p.kill()
            p.wait()
        for pid in pids:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- Horovod and doctor
HVD_SUM = """
import torch, mpidl
import horovod.torch as hvd
w = mpidl.init()
hvd.init()
assert hvd.rank() == w.rank and hvd.size() == w.size
t = torch.tensor([float(w.rank + 1), 10.0 * (w.rank + 1)])
s = hvd.allreduce(t, op=hvd.Sum, name="t")
rows = w.comm.gather(s.tolist(), root=0)   # one writer: ranks' stdout lines can interleave
if w.rank == 0:
    for r, row in enumerate(rows):
        print("sum", r, row, flush=True)
"""


@needs_horovod
@pytest.mark.parametrize("np_", [2, 3])
def test_horovod_allreduce_sums(np_):
    r = mpirun(np_, pycode(HVD_SUM), timeout=120)
    assert r.returncode == 0, r.output
    expect = [sum(range(1, np_ + 1)) * 1.0, 10.0 * sum(range(1, np_ + 1))]
    sums = [line for line in r.stdout.splitlines() if line.startswith("sum")]
    assert [int(line.split()[1]) for line in sums] == list(range(np_))
    for line in sums:
        assert json.loads(line.split(" ", 2)[2]) == expect


@needs_horovod
def test_doctor_json_reports_horovod_with_mpi():
    r = run(mpidl_cmd("doctor", "--json"))
    report = json.loads(r.stdout)
    hvd = report["checks"]["horovod"]
    assert hvd["ok"] and hvd["info"]["mpi"] is True and hvd["info"]["version"] == "0.28.1"
    assert report["checks"]["mpi"]["info"]["library"].startswith(("Open MPI", "MPICH", "Intel"))
    assert report["ok"] is True and r.returncode == 0, r.output


LOGS = """
import mpidl
from mpidl import log
w = mpidl.init()
log.get().info("info from %d", w.rank)
log.get().warning("warning from %d", w.rank)
"""


def test_logging_rank0_info_others_warnings_prefixed():
    r = mpirun(2, pycode(LOGS))
    assert r.returncode == 0, r.output
    assert "info from 0" in r.output and "info from 1" not in r.output
    assert "warning from 0" in r.output
    warn1 = [line for line in r.output.splitlines() if "warning from 1" in line]
    assert len(warn1) == 1 and warn1[0].startswith("[rank 1] ")


# Rank 0 is busy for 3 s (a checkpoint it writes); rank 1 waits at the barrier: the CPU it spends
# there, its process's own clock, and whether the barrier held it until rank 0 arrived.
QUIET_BARRIER = """
import json, time, mpidl
w = mpidl.init()
if w.rank == 0:
    time.sleep(3)
cpu, t0 = time.process_time(), time.monotonic()
w.barrier("rank 0's checkpoint")
print("RESULT " + json.dumps([w.rank, time.process_time() - cpu, time.monotonic() - t0]), flush=True)
"""


def test_a_rank_waiting_at_a_barrier_sleeps_instead_of_spinning():
    """A blocking MPI barrier spins: about 3 CPU-s for these 3 s, with mpi_yield_when_idle or not."""
    r = mpirun(2, pycode(QUIET_BARRIER), timeout=60)
    assert r.returncode == 0, r.output
    spent = {rank: (cpu, waited) for rank, cpu, waited in results(r)}
    cpu, waited = spent[1]
    assert waited > 2.5, spent  # it did wait for rank 0
    assert cpu < 0.5, spent


def test_shared_gpu_warning():
    from mpidl.world import shared_gpu_warning

    assert shared_gpu_warning(4, 4) is None and shared_gpu_warning(1, 8) is None
    assert shared_gpu_warning(2, 0) is None  # no GPU: CPU ranks share nothing to warn about
    msg = shared_gpu_warning(8, 4)
    assert msg.startswith("8 ranks on this node share 4 visible GPU(s)") and "one rank per GPU" in msg
