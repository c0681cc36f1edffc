"""A user's own code on the real local cluster: their job spec through submitit, their loop and a
plain Horovod script through `mpidl submit -- CMD`; preempted mid-epoch, requeued, resumed, and
ending with the weights of an uninterrupted run. The user's package lives in a temporary folder
(nothing under mpidl/); see userpkg.py."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

import userpkg
from conftest import PYTHON, clean_env, mpidl_cmd, mpirun, needs_horovod, run
from test_slurm_preemption import _signal_ranks_at_step
from test_train import final_weights


def _submit_and_preempt(cmd: list[str], cwd, env: dict, run_dir) -> str:
    """Run `mpidl submit --wait ...`; once step 20 is logged in run_dir, send SLURM's warning signal."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env=clean_env(env))
    job_id, lines = None, []
    try:
        while job_id is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            if line.startswith("submitted job "):
                job_id = line.split()[2]

        def scancel() -> None:
            r = run(["scancel", "--signal=USR2", job_id], env=env)
            assert r.returncode == 0, r.output

        _signal_ranks_at_step(run_dir, 20, proc.pid, lambda: proc.poll() is None, scancel)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            if job_id is not None:
                run(["scancel", job_id], env=env)
    assert proc.returncode == 0, "".join(lines) + out[-3000:]
    return "".join(lines) + out


def _resumed_mid_run(run_dir, out: str, steps: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted"] is None and summary["global_step"] == steps, out[-3000:]
    stopped = re.search(r"preempted by SIGUSR2 at step (\d+) \(checkpoint written\): requeueing job", out)
    assert stopped, out[-3000:]
    resumed = int(summary["resumed_from"].rsplit("-", 1)[1].split(".")[0])
    assert resumed == int(stopped.group(1)) and 20 <= resumed < steps, resumed


def _same_weights(a_dir, b_dir) -> None:
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.timeout(900)
def test_a_user_job_spec_is_preempted_requeued_and_resumes_exactly(slurm_cluster, tmp_path):
    over = {"epochs": 3, "log_every": 1, "slurm": {"tasks_per_node": 2, "time": "0:20:00"}}
    job = userpkg.make(tmp_path, **over)
    r = mpirun(2, mpidl_cmd("train", str(job), "--set", f"output={tmp_path}/reference"), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    run_dir = tmp_path / "run"
    out = _submit_and_preempt([PYTHON, "-m", "mpidl.cli", "submit", "--wait", str(job), "--set", f"output={run_dir}"],
                              tmp_path, slurm_cluster, run_dir)
    _resumed_mid_run(run_dir, out, 3 * (1800 // 32))
    _same_weights(tmp_path / "reference" / "checkpoints", run_dir / "checkpoints")


LOOP = '''
import sys
import mpidl_loop

mpidl_loop.main(sys.argv[1])   # argv[2], the run folder, only names the ranks for the test
'''


@pytest.mark.timeout(900)
def test_your_own_loop_through_submit_is_preempted_requeued_and_resumes_exactly(slurm_cluster, tmp_path):
    userpkg.make(tmp_path)
    (tmp_path / "loop.py").write_text(LOOP)
    r = run(mpidl_cmd("data", "synth", "tabular", "--out", str(tmp_path / "tab.h5"), "--rows", "6000", "--features",
                      "16", "--classes", "4", "--rule", "nonlinear"), cwd=tmp_path)
    assert r.returncode == 0, r.output
    reference = tmp_path / "reference"
    r = mpirun(2, [PYTHON, "loop.py", "tab.h5"], cwd=tmp_path, env={"MPIDL_BACKEND": "mpi",
                                                                     "MPIDL_OUTPUT": str(reference)})
    assert r.returncode == 0, r.output[-3000:]
    run_dir = tmp_path / "runs" / "example"  # the script's own folder: a single job keeps it
    env = {**slurm_cluster, "MPIDL_BACKEND": "mpi", "MPIDL_LOG_EVERY": "1"}  # a record a step: the test waits for 20
    out = _submit_and_preempt([PYTHON, "-m", "mpidl.cli", "submit", "--wait", "--tasks-per-node", "2", "--time", "20",
                               "--", "python", "loop.py", "tab.h5", str(run_dir)], tmp_path, env, run_dir)
    _resumed_mid_run(run_dir, out, 5 * (6000 // 128))
    _same_weights(reference / "checkpoints", run_dir / "checkpoints")
    logs = list((tmp_path / "runs" / "loop").glob("slurm-*.out"))  # the job's log, in the submission's folder
    assert len(logs) == 1 and "preempted by SIGUSR2" in logs[0].read_text()


HOROVOD_ONLY = '''
import torch
import horovod.torch as hvd

hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
print(f"rank {hvd.rank()} of {hvd.size()}: sum {total.item():g}", flush=True)
'''


@needs_horovod
@pytest.mark.timeout(600)
def test_a_plain_horovod_script_through_submit(slurm_cluster, tmp_path):
    (tmp_path / "hvd_only.py").write_text(HOROVOD_ONLY)
    r = run([PYTHON, "-m", "mpidl.cli", "submit", "--wait", "--tasks-per-node", "2", "--time", "5", "--",
             "python", "hvd_only.py"], cwd=tmp_path, env=slurm_cluster, timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    log = next((tmp_path / "runs" / "hvd_only").glob("slurm-*.out")).read_text()
    assert "rank 0 of 2: sum 3" in log and "rank 1 of 2: sum 3" in log, log


def test_submit_command_bad_input_is_one_line(tmp_path):
    def submit(*args):
        return run([PYTHON, "-m", "mpidl.cli", "submit", "--dry-run", *args], cwd=tmp_path)

    r = submit("--nodes", "0", "--", "python", "x.py")
    assert r.returncode == 2 and "slurm.nodes = 0: at least 1 node" in r.stderr, r.output
    r = submit("--array", "lr=1,2", "--", "python", "x.py", "--lr", "{learning_rate}")
    assert r.returncode == 2 and "the command has {learning_rate}, which no --array key gives" in r.stderr, r.output
    r = submit("--")
    assert r.returncode == 2 and "no command after `--`" in r.stderr, r.output
    (tmp_path / "res.yaml").write_text("slurm: {nodez: 2}\n")
    r = submit("res.yaml", "--", "python", "x.py")
    assert r.returncode == 2 and "res.yaml: unknown key 'slurm.nodez' — did you mean 'slurm.nodes'?" in r.stderr
    (tmp_path / "res.yaml").write_text("slurm: {nodes: 1, tasks_per_node: 2, env: {A: 'b c'}}\n")
    r = submit("res.yaml", "--time", "5", "--", "python", "x.py", "--msg", "it's $(here)")
    assert r.returncode == 0, r.output
    script = (tmp_path / "slurm" / "generated" / "x.sbatch").read_text()
    # every word the user gave arrives as given: quoted for the shell
    assert "srun --mpi=pmix python x.py --msg 'it'\"'\"'s $(here)'" in script and "export A='b c'" in script
    assert "#SBATCH --time=5" in script and "#SBATCH --output=runs/x/slurm-%j.out" in script


@pytest.mark.timeout(900)
def test_a_signal_during_set_up_and_during_the_final_save(slurm_cluster, tmp_path):
    """SLURM's warning signal outside the training loop, through submitit on the local cluster.
    During set-up (the model is being built): the job stops before its first step with a
    checkpoint, requeues, resumes and ends with the uninterrupted run's weights. During the final
    checkpoint (its third state_dict: the broadcast, epoch 1's checkpoint, the last): the save
    completes and the job ends as finished, not requeued. Before, both ended rank 0 with status 140."""
    over = {"model.name": "mynets.models:signalling_net", "transform": None,
            "slurm": {"tasks_per_node": 2, "time": "0:20:00"}}
    job = userpkg.make(tmp_path, **over)
    r = mpirun(2, mpidl_cmd("train", str(job), "--set", f"output={tmp_path}/reference"), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.output[-3000:]

    def submit(run_dir, *sets):
        return run([PYTHON, "-m", "mpidl.cli", "submit", "--wait", str(job), "--set", f"output={run_dir}",
                    *[x for s in sets for x in ("--set", s)]], cwd=tmp_path, env=slurm_cluster, timeout=900)

    r = submit(tmp_path / "setup", "model.args.signal_in_setup=true")
    assert r.returncode == 0, r.output[-3000:]
    assert "preempted by SIGUSR2 at step 0 (checkpoint written): requeueing job" in r.stdout, r.output[-3000:]
    assert "ended: COMPLETED, exit status 0, 1 restart(s)" in r.stdout, r.output[-3000:]
    summary = json.loads((tmp_path / "setup" / "summary.json").read_text())
    assert summary["resumed_from"].endswith("ckpt-000000000.pt") and summary["global_step"] == 2 * (1800 // 32)
    _same_weights(tmp_path / "reference" / "checkpoints", tmp_path / "setup" / "checkpoints")

    r = submit(tmp_path / "final", "model.args.signal_at_state_dict=3")
    assert r.returncode == 0, r.output[-3000:]
    assert "ended: COMPLETED, exit status 0, 0 restart(s)" in r.stdout and "preempted" not in r.stdout, r.output[-3000:]
    summary = json.loads((tmp_path / "final" / "summary.json").read_text())
    assert summary["preempted"] is None and summary["global_step"] == 2 * (1800 // 32)
    _same_weights(tmp_path / "reference" / "checkpoints", tmp_path / "final" / "checkpoints")
