"""Node-local staging (mpidl/data/staging.py): the private folder, what is reused, what is removed.

Multi-rank staging (one stager per node, a fixed share per rank) is in test_data.py and, across
emulated nodes, test_multinode.py.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import h5py
import numpy as np
import pytest
import yaml

from conftest import mpidl_cmd, mpirun, pycode, run
from mpidl.errors import BadInput

UID = os.getuid()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:  # row i holds i
        f["x"] = np.repeat(np.arange(400, dtype=np.float32)[:, None], 4, axis=1)
        f["y"] = np.arange(400)
    return path


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_TMPDIR"):
        monkeypatch.delenv(var, raising=False)


def loader(path, stage_dir):
    import mpidl
    from mpidl.data import H5Source, ShardedLoader

    return ShardedLoader(H5Source(str(path)), mpidl.init(), batch_size=8, seed=1, stage_dir=str(stage_dir))


def labels(ld, epoch=0) -> list[int]:
    ld.set_epoch(epoch)
    return [int(v) for _, y in ld for v in y]


class Warnings(logging.Handler):
    """What the mpidl logger warns about (it does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("mpidl").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("mpidl").removeHandler(self)


def plant(tmp_path, data, stage, tamper):
    """Stage under SLURM job 4242, close (the file goes), then plant a copy of it under its name,
    its rows changed or not, its digest as written. (path, the rows first read)"""
    ld = loader(data, stage)
    first = labels(ld)
    path = ld.staged_path
    assert path.parent == stage / f"mpidl-{UID}" and "-j4242.h5" in path.name
    copy = tmp_path / "copy.h5"
    shutil.copy(path, copy)
    ld.close()
    assert not path.exists()
    if tamper:
        with h5py.File(copy, "r+") as f:
            f["y"][:8] = 999_999
            f["x"][:8] = 999_999
    shutil.copy(copy, path)
    return path, first


def test_a_planted_file_with_other_rows_is_staged_again(tmp_path, data, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    stage = tmp_path / "stage"
    path, first = plant(tmp_path, data, stage, tamper=True)
    with Warnings() as warned:
        ld = loader(data, stage)
        again = labels(ld)
    assert again == first and 999_999 not in again
    assert len(warned.lines) == 1 and str(path) in warned.lines[0], warned.lines
    assert "does not match its content digest: staging it again" in warned.lines[0]
    ld.close()
    assert list((stage / f"mpidl-{UID}").iterdir()) == []


def test_the_same_jobs_intact_file_is_reused(tmp_path, data, monkeypatch):
    """A requeued job (same SLURM id) takes what it staged, checked; another job never does."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    stage = tmp_path / "stage"
    path, first = plant(tmp_path, data, stage, tamper=False)
    inode = path.stat().st_ino
    with Warnings() as warned:
        ld = loader(data, stage)
        assert labels(ld) == first
    assert warned.lines == [] and ld.staged_path == path and path.stat().st_ino == inode  # not rewritten
    ld.close()
    shutil.copy(tmp_path / "copy.h5", path)
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    other = loader(data, stage)
    assert labels(other) == first
    assert other.staged_path != path and other.staged_path.name.endswith("-j4243.h5")
    other.close()
    assert [p.name for p in (stage / f"mpidl-{UID}").iterdir()] == [path.name]  # another job's: left alone


@pytest.mark.parametrize("planted,why", [
    ("other owner", f"is owned by uid 65534, not by this user (uid {UID})"),
    ("mode 0777", "has mode 0777: group or others may use it (it must be 0700)"),
    ("symlink", "is a symbolic link, not a folder"),
    ("file", "is not a folder"),
])
def test_a_folder_not_ours_alone_is_refused_in_one_line(tmp_path, data, planted, why):
    stage = tmp_path / "stage"
    mine = stage / f"mpidl-{UID}"
    stage.mkdir()
    if planted == "other owner":
        if UID != 0:
            pytest.skip("chown to another user needs root")
        mine.mkdir(mode=0o700)
        os.chown(mine, 65534, 65534)
    elif planted == "mode 0777":
        mine.mkdir()
        os.chmod(mine, 0o777)
    elif planted == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        mine.symlink_to(tmp_path / "elsewhere")
    else:
        mine.write_text("")
    with pytest.raises(BadInput) as e:
        loader(data, stage)
    msg = str(e.value)
    assert msg == f"data.stage_dir {str(stage)!r}: {mine} {why}; remove it or choose another stage_dir"
    assert list((tmp_path / "elsewhere").iterdir() if planted == "symlink" else []) == []


def test_stage_dir_expands_variables_and_auto(tmp_path, data, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value, where in [("$TMPDIR/stage", tmp_path / "tmp" / "stage"), ("${TMPDIR}", tmp_path / "tmp"),
                         ("~/stage", tmp_path / "home" / "stage"), ("auto", tmp_path / "tmp")]:
        ld = loader(data, value)
        labels(ld)
        assert ld.staged_path.parent == where / f"mpidl-{UID}", value
        ld.close()
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "job"))  # auto: SLURM's job folder first
    ld = loader(data, "auto")
    labels(ld)
    assert ld.staged_path.parent == tmp_path / "job" / f"mpidl-{UID}"
    ld.close()
    assert not (tmp_path / "$TMPDIR").exists() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("value,var", [("$MPIDL_NO_SUCH_VAR/stage", "MPIDL_NO_SUCH_VAR"),
                                       ("${MPIDL_EMPTY}/stage", "MPIDL_EMPTY")])
def test_an_unset_variable_is_refused_in_one_line(tmp_path, data, monkeypatch, value, var):
    monkeypatch.delenv("MPIDL_NO_SUCH_VAR", raising=False)
    monkeypatch.setenv("MPIDL_EMPTY", "")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as e:
        loader(data, value)
    assert str(e.value) == f"data.stage_dir {value!r}: ${var} is not set here"
    assert list(tmp_path.iterdir()) == [data]  # nothing made anywhere


TRAIN = """
import json, sys
from mpidl.spec import load_spec
from mpidl.train.trainer import Trainer

trainer = Trainer(load_spec(sys.argv[1]))
trainer.fit()
path = trainer.inputs.loader.staged_path
before = path.exists()
trainer.close()  # the trainer is still referenced: nothing is collected
print("STAGED " + json.dumps([str(path), before, path.exists()]), flush=True)
"""


def small_job(tmp_path, **data) -> str:
    job = {"name": "t", "seed": 3, "steps": 4, "backend": "mpi", "output": str(tmp_path / "run"),
           "data": {"files": str(tmp_path / "tab.h5"), "batch": 16, "stage_dir": str(tmp_path / "stage"),
                    "synth": {"kind": "tabular", "rows": 400, "features": 8, "classes": 3}},
           "model": {"name": "mlp", "args": {"hidden": [8], "num_classes": 3}},
           "optimizer": {"name": "sgd", "lr": 0.05}}
    job["data"].update(data)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return str(tmp_path / "job.yaml")


def test_a_training_run_removes_its_staged_file_at_its_end(tmp_path):
    r = run(pycode(TRAIN) + [small_job(tmp_path)], timeout=120)  # one process, no launcher
    assert r.returncode == 0, r.output[-3000:]
    path, existed, exists_after = json.loads(next(line for line in r.stdout.splitlines()
                                                  if line.startswith("STAGED "))[7:])
    assert existed and not exists_after  # gone at Trainer.close(), not only when collected or at exit
    assert path.startswith(str(tmp_path / "stage" / f"mpidl-{UID}"))
    assert list((tmp_path / "stage" / f"mpidl-{UID}").iterdir()) == []


def test_a_refused_folder_stops_every_rank_with_one_line(tmp_path):
    (tmp_path / "stage" / f"mpidl-{UID}").mkdir(parents=True)
    os.chmod(tmp_path / "stage" / f"mpidl-{UID}", 0o777)
    r = mpirun(2, mpidl_cmd("train", small_job(tmp_path)), timeout=120)
    assert r.returncode == 2, r.output[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert errors == [f"[rank 0] error: data.stage_dir {str(tmp_path / 'stage')!r}: {tmp_path / 'stage' / f'mpidl-{UID}'} "
                      "has mode 0777: group or others may use it (it must be 0700); remove it or choose another "
                      "stage_dir"], r.stderr
    assert "Traceback" not in r.stderr
