"""`mpidl check`: the demo and a user's own job pass; each fault planted here fails its own line,
naming what and where (real mpirun ranks, the real trainer; the local SLURM controller for the
slurm: line)."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import h5py
import pytest

import userpkg
from conftest import ROOT, mpidl_cmd, run

LINE = re.compile(r"^  (\w+)\s+(ok|FAIL|skipped)\s+(.*)$")
CHECKS = ["spec", "data", "loss", "shares", "weights", "preemption", "resume", "slurm", "estimate"]

FAULTS = '''
    import torch
    from torch import nn

    from mynets.models import TinyNet


    class Drifting(TinyNet):
        """A parameter no optimizer owns, moved by each rank's own batch: left out of the allreduce."""

        def __init__(self, in_features, num_classes, hidden=32):
            super().__init__(in_features, num_classes, hidden)
            self.scale = nn.Parameter(torch.ones(1), requires_grad=False)

        def forward(self, x):
            if self.training:
                with torch.no_grad():
                    self.scale += 1e-3 * x.mean()
            return super().forward(x) * self.scale


    class Counting(TinyNet):
        """State a checkpoint does not hold: a count of training steps that scales the output."""

        def __init__(self, in_features, num_classes, hidden=32):
            super().__init__(in_features, num_classes, hidden)
            self.calls = 0

        def forward(self, x):
            if self.training:
                self.calls += 1
            return super().forward(x) * (1 + 0.05 * self.calls)
'''


def check(cwd: Path, *args: str, env: dict | None = None) -> tuple[int, dict[str, tuple[str, str]], str]:
    """`mpidl check ARGS` in `cwd`: (exit status, name -> (status, detail), output)."""
    r = run(mpidl_cmd("check", "--out", str(cwd / "check"), *args), cwd=cwd, env=env, timeout=900)
    lines = {m[1]: (m[2], m[3]) for m in map(LINE.match, r.stdout.splitlines()) if m}
    return r.returncode, lines, r.output


def only_failures(lines: dict) -> dict:
    return {k: v for k, v in lines.items() if v[0] == "FAIL"}


@pytest.fixture
def user(tmp_path) -> Path:
    """The user's folder (tests/userpkg.py) with two faulty models beside their own."""
    job = userpkg.make(tmp_path)
    (tmp_path / "mynets" / "faults.py").write_text(textwrap.dedent(FAULTS).lstrip())
    return job


@pytest.mark.mpi  # its child starts mpirun
def test_the_demo_passes_every_check(tmp_path):
    code, lines, out = check(tmp_path, str(ROOT / "jobs" / "demo.yaml"))
    assert code == 0, out
    assert list(lines) == CHECKS, out
    assert {k: s for k, (s, _) in lines.items() if s != "ok"} == {"slurm": "skipped"}, out
    assert lines["slurm"][1].startswith("no controller"), out
    assert "written by the spec's data.synth" in lines["data"][1]  # data/demo-images.h5 is not in tmp_path
    assert "SIGUSR2 during step 4 on rank 1: every rank stopped after step 5 with a checkpoint, exit 3" \
        == lines["preemption"][1]
    assert lines["resume"][1] == "resumed at step 5: steps 6-8 equal the uninterrupted run's bit for bit"
    assert re.match(r"[\d.]+ ms a step on 2 CPU ranks here \(batch 64 a rank, median of 7 steps\); peak memory \d+ "
                    r"MiB a rank", lines["estimate"][1]), lines["estimate"]
    assert not (tmp_path / "runs").exists()  # everything under --out


@pytest.mark.mpi  # mpirun started inside mpidl (or inside the batch job), out of the static look's sight
def test_a_users_own_code_passes_and_the_controller_accepts_it(slurm_cluster, user):
    code, lines, out = check(user.parent, "job.yaml", env=slurm_cluster)
    assert code == 0 and list(lines) == CHECKS and not only_failures(lines), out
    assert all(s == "ok" for s, _ in lines.values()), out
    assert lines["spec"][1].startswith("job.yaml validates: model mynets.models:TinyNet")
    assert lines["slurm"][1].startswith("sbatch --test-only: ")


@pytest.mark.mpi  # mpirun started inside mpidl (or inside the batch job), out of the static look's sight
def test_a_diverging_learning_rate_and_a_slurm_section_the_controller_refuses(slurm_cluster, user):
    code, lines, out = check(user.parent, "job.yaml", "--set", "optimizer.lr=1e12", "--set", "slurm.tasks_per_node=3",
                             env=slurm_cluster)
    assert code == 1, out
    assert set(only_failures(lines)) == {"loss", "slurm"}, out
    assert re.search(r"non-finite loss \((nan|inf)\) at step \d+ on rank \d", lines["loss"][1]), lines["loss"]
    assert "the controller refused the job (sbatch --test-only: " in lines["slurm"][1], lines["slurm"]
    assert lines["preemption"] == ("skipped", "the uninterrupted run failed (see loss)")


@pytest.mark.mpi  # its child starts mpirun
def test_labels_outside_the_models_classes_and_a_slice_of_real_data(user):
    folder = user.parent
    from mpidl.data import synth

    synth.synth_tabular(str(folder / "labels.h5"), 2000, features=8, classes=3, seed=1)
    with h5py.File(folder / "labels.h5", "a") as f:
        f["y"][1500] = 5
    own = ["--set", "data.files=labels.h5", "--set", "data.synth=null", "--steps", "6"]
    code, lines, out = check(folder, "job.yaml", *own, "--set", "model.args.num_classes=3")
    assert code == 1 and set(only_failures(lines)) == {"data"}, out
    assert lines["data"][1].startswith("labels.h5: dataset 'y' row 1500 holds label 5, outside [0, 3) for 3 classes")
    assert lines["loss"] == ("skipped", "no data to run on") and not (folder / "check" / "a.log").exists()

    # The class count left to the labels: 6, from row 1500 too, which the slice therefore holds.
    # 6 steps: 2 an epoch × 2 ranks × batch 16 = 64 training rows, and 7 held out (val_fraction 0.1).
    # One run on the slice (--only): preemption and resume would run the same rows again.
    code, lines, out = check(folder, "job.yaml", *own, "--only", "data,loss")
    assert code == 0, out
    assert lines["data"][1].startswith("the first 71 rows of labels.h5 and 1 holding the label range (2000 rows")
    with h5py.File(folder / "check" / "data" / "slice.h5", "r") as f:
        assert f["y"].shape == (72,) and int(f["y"][:].max()) == 5


@pytest.mark.mpi  # its child starts mpirun
def test_ranks_that_diverge(user):
    # The weights line needs run A alone: --only skips the preemption's and the resume's launches.
    code, lines, out = check(user.parent, "job.yaml", "--set", "model.name=mynets.faults:Drifting", "--only", "weights")
    assert code == 1 and "weights" in only_failures(lines), out
    assert lines["weights"][1].startswith("after step 1, rank 1's scale differs from rank 0's (1 of 5 parameters")
    assert lines["resume"] == lines["slurm"] == ("skipped", "not asked (--only)"), out
    assert (user.parent / "check" / "a.log").exists() and not (user.parent / "check" / "b.log").exists()


@pytest.mark.mpi  # its child starts mpirun
def test_a_checkpoint_that_does_not_resume_exactly(user):
    code, lines, out = check(user.parent, "job.yaml", "--set", "model.name=mynets.faults:Counting")
    assert code == 1 and set(only_failures(lines)) == {"resume"}, out
    assert lines["resume"][1].startswith("after resuming at step 5, step 6's body.0.weight differs from the "
                                         "uninterrupted run's"), lines["resume"]
    assert lines["weights"][0] == lines["preemption"][0] == "ok"


@pytest.mark.mpi  # its child starts mpirun
def test_a_stand_in_of_the_data_shapes(user):
    folder = user.parent
    missing = ["--set", "data.files=elsewhere/train.h5", "--set", "data.synth=null", "--steps", "6"]
    code, lines, out = check(folder, "job.yaml", *missing)
    assert code == 1 and set(only_failures(lines)) == {"data"}, out
    assert "elsewhere/train.h5: file not found; for a stand-in of the same shapes give them: --shape" \
        in lines["data"][1]

    code, lines, out = check(folder, "job.yaml", *missing, "--shape", "x=8:float32", "--shape", "y=:int64",
                             "--classes", "3", "--only", "data,loss")  # one run on the stand-in
    assert code == 0, out
    assert lines["data"][1] == "71 random rows, shapes from the --shape flags: x 8 float32, y scalar int64"


@pytest.mark.parametrize("args,expect", [
    (["--set", "optimizer.lr=-1"], "optimizer.lr = -1: Input should be greater than 0"),
    (["--steps", "3"], "--steps 3: at least 6"),
    (["--shape", "x=8:floaty"], None),
    (["--only", "loss,wights"], "--only loss,wights: unknown line 'wights'; the lines: spec, data,"),
])
def test_bad_input_exits_2(user, args, expect):
    code, lines, out = check(user.parent, "job.yaml", *args)
    if expect is None:  # a flag the data line reports: the spec is fine
        assert code == 1 and lines["data"][1].startswith("--shape 'x=8:floaty': expected KEY=DIMS:DTYPE"), out
        return
    assert code == 2 and expect in out, out
    assert "Traceback" not in out


@pytest.mark.mpi  # its child starts mpirun
def test_a_loop_of_ones_own_on_mpidl_run(user):
    """`mpidl check -- python mpidl_loop.py DATA`: the example's loop, on its own data, with the
    run folder and length the check gives it (MPIDL_OUTPUT, MPIDL_STEPS)."""
    folder = user.parent
    from mpidl.data import synth

    synth.synth_tabular(str(folder / "example.h5"), 4000, features=16, classes=4, seed=2)
    code, lines, out = check(folder, "--", "python", "mpidl_loop.py", "example.h5")
    assert code == 0 and list(lines) == CHECKS, out
    assert {k for k, (s, _) in lines.items() if s != "ok"} == {"data", "slurm"}, out
    assert lines["shares"][1] == "512 rows a rank in epoch 0, equal and disjoint in the run's one epoch"
    assert lines["resume"][1] == "resumed at step 5: steps 6-8 equal the uninterrupted run's bit for bit"
    assert not (folder / "runs").exists()  # its runs/example went where the check said


@pytest.mark.parametrize("text,expect", [
    ("epoch 1/3\n[rank 1] error: non-finite loss (nan) at step 3 on rank 1\n--------\nmpirun detected that one",
     "[rank 1] error: non-finite loss (nan) at step 3 on rank 1"),
    ("[rank 0] Traceback (most recent call last):\n[rank 0]   File \"x.py\", line 3\n[rank 0] KeyError: 'y'\n",
     "[rank 0] KeyError: 'y'"),
    ("----------\nmpirun has detected an attempt to run as root.\n\nRunning as root is *strongly* discouraged\n"
     "----------\n", "exit status 1: mpirun has detected an attempt to run as root."),
    ("step 1\nmpirun noticed that process rank 1 with PID 7 on node vm exited on signal 11 (Segmentation fault).\n",
     "exit status 1: mpirun noticed that process rank 1 with PID 7 on node vm exited on signal 11 (Segmentation "
     "fault)."),
])
def test_the_line_that_says_why_a_run_failed(text, expect):
    from mpidl.check.runner import reason

    assert reason(text, 1) == expect
