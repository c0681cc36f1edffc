"""mpidl's pytest plugin (mpidl/testing.py) on a user's test file in a temporary folder, run by
a pytest of its own as a user runs it: real mpirun ranks, real failures, a real hang."""
from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, run

USER_TESTS = '''
import time

import pytest


@pytest.mark.mpirun(2)
def test_pass(world):
    assert world.comm.allreduce(world.rank + 1) == 3


@pytest.mark.mpirun(2, timeout=300)
def test_assert_on_rank_1(world):
    assert world.rank != 1, "rank 1 disagrees"
    world.barrier()          # rank 0 waits here for rank 1, which never comes


@pytest.mark.mpirun(2, timeout=300)
def test_exception_on_rank_1(world):
    if world.rank == 1:
        raise ValueError("no such shard on rank 1")
    world.comm.bcast(None, root=1)


@pytest.mark.mpirun(2, timeout=10)
def test_hang(world):
    if world.rank == 0:
        world.comm.recv(source=1)   # rank 1 never sends


@pytest.mark.mpirun([1, 3])
def test_fixtures(world, mpirun_np, shared_tmp_path, run_dir, h5_file):
    import h5py

    assert world.size == mpirun_np
    (shared_tmp_path / f"rank-{world.rank}").write_text("here")
    world.barrier()
    assert sorted(p.name for p in shared_tmp_path.glob("rank-*")) == [f"rank-{r}" for r in range(world.size)]
    assert run_dir.parent == shared_tmp_path and not run_dir.exists()
    with h5py.File(h5_file, "r") as f:
        assert f["x"].shape == (512, 8) and f["y"].dtype.kind == "i"


def test_in_this_process():
    assert True


@pytest.mark.mpirun(2)
def test_after_the_failures(world):
    assert world.size == 2
'''


def run_user_tests(folder: Path, *args: str, env: dict | None = None) -> tuple[dict, str]:
    """pytest on the user's file; (outcome and message per test, the terminal output)."""
    (folder / "test_user.py").write_text(USER_TESTS)
    r = run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={folder / 'junit.xml'}",
             f"--basetemp={folder / 'tmp'}", *args, "test_user.py"], cwd=folder, env=env, timeout=900)
    results = {}
    for case in ET.parse(folder / "junit.xml").getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        results[case.get("name")] = ("failed", bad.get("message", "") + "\n" + (bad.text or "")) \
            if bad is not None else ("skipped", "") if case.find("skipped") is not None else ("passed", "")
    return results, r.output


def rank_pids(folder: Path) -> list[int]:
    """Every rank process the plugin started (each rank's first record names its pid)."""
    pids = []
    for f in (folder / "tmp" / "mpirun").glob("launch-*/rank-*.jsonl"):
        first = f.read_text().splitlines()[0]
        pids.append(json.loads(first)["pid"])
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.mpi  # its child starts mpirun
def test_user_file_passes_fails_and_times_out_per_rank(tmp_path):
    results, output = run_user_tests(tmp_path, "-p", "mpidl.testing")
    assert results["test_pass"] == ("passed", ""), output
    outcome, message = results["test_assert_on_rank_1"]
    # rank 1's own message, not a timeout: it ended the launch, and rank 0 was not left in the barrier
    assert outcome == "failed" and message.startswith("[rank 1] AssertionError: rank 1 disagrees"), message
    assert "failed on rank 1 of 2" in message
    outcome, message = results["test_exception_on_rank_1"]
    assert outcome == "failed" and message.startswith("[rank 1] ValueError: no such shard on rank 1"), message
    outcome, message = results["test_hang"]
    assert outcome == "failed" and "timed out after 10 s on 2 ranks (rank(s) 0 still in the test)" in message, message
    waits = next(n for n, line in enumerate(USER_TESTS.splitlines(), 1) if "recv(source=1)" in line)
    assert f'test_user.py", line {waits} in test_hang' in message, message  # where rank 0 waited
    for name in ("test_fixtures[np=1]", "test_fixtures[np=3]", "test_in_this_process", "test_after_the_failures"):
        assert results[name] == ("passed", ""), (name, results[name], output[-3000:])
    assert "FAILED test_user.py::test_assert_on_rank_1 - [rank 1] AssertionError" in output  # the summary line
    # launches: np=1; np=2 until the assertion, again until the exception, again until the hang,
    # and a last one for the test after it; np=3
    launches = sorted(p.name for p in (tmp_path / "tmp" / "mpirun").glob("launch-*"))
    assert len(launches) == 6, launches
    left = [pid for pid in rank_pids(tmp_path) if alive(pid)]
    assert not left, f"rank processes left running: {left}"


@pytest.mark.mpi  # its child starts mpirun
def test_isolate_gives_each_test_a_launch(tmp_path):
    results, output = run_user_tests(tmp_path, "-p", "mpidl.testing", "--mpirun-isolate", "-k",
                                     "pass or fixtures or after")
    assert [results[k][0] for k in sorted(results)] == ["passed"] * 4, output[-3000:]
    assert len(list((tmp_path / "tmp" / "mpirun").glob("launch-*"))) == 4


@pytest.mark.mpi  # its child starts mpirun
def test_pip_install_registers_the_plugin(tmp_path):
    """The pytest11 entry point: installed from this checkout, the plugin loads with no -p."""
    site = tmp_path / "site"
    r = run([PYTHON, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
             "--target", str(site), str(ROOT)], timeout=300)
    assert r.returncode == 0, r.output
    entry_points = next(site.glob("mpidl-*.dist-info")) / "entry_points.txt"
    assert "mpidl.testing = mpidl.testing" in entry_points.read_text()
    # only the installed copy on the path (as a user has it), not this checkout
    results, output = run_user_tests(tmp_path, "-k", "test_pass", env={"PYTHONPATH": str(site)})
    assert results == {"test_pass": ("passed", "")}, output[-3000:]


XDIST_TESTS = """
import os
import pytest

def note(name):  # which rank process ran which test
    with open(os.path.join(os.environ["RAN_LOG"], str(os.getpid())), "a") as f:
        f.write(name + "\\n")

@pytest.mark.mpirun(2)
def test_a(world):
    note("a")

@pytest.mark.mpirun(2)
def test_b(world):
    note("b")

@pytest.mark.mpirun(2)
def test_c(world):
    note("c")

def test_plain_1():
    pass

def test_plain_2():
    pass
"""


@pytest.mark.mpi  # its child starts mpirun
@pytest.mark.parametrize("dist,launches", [("loadgroup", 1), ("load", 3)])
def test_under_xdist_each_marked_test_runs_once_per_rank(tmp_path, dist, launches):
    """pytest -n 2: --dist loadgroup keeps a module's marked tests on one worker, in one launch;
    --dist load may split them, so each is a launch of its own. Never twice on any rank."""
    (tmp_path / "test_x.py").write_text(XDIST_TESTS)
    log = tmp_path / "ran"
    log.mkdir()
    r = run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mpidl.testing", "-n", "2", "--dist", dist,
             "-rA", f"--basetemp={tmp_path / 'tmp'}", "test_x.py"], cwd=tmp_path, env={"RAN_LOG": str(log)},
            timeout=600)
    assert r.returncode == 0, r.output[-3000:]
    passed = sorted(line.split()[1].split("@")[0] for line in r.stdout.splitlines() if line.startswith("PASSED "))
    assert passed == [f"test_x.py::test_{n}" for n in ("a", "b", "c", "plain_1", "plain_2")], r.output[-3000:]
    ran = {f.name: f.read_text().split() for f in log.iterdir()}
    assert sorted(t for tests in ran.values() for t in tests) == ["a", "a", "b", "b", "c", "c"], ran
    assert len(ran) == 2 * launches, ran  # rank processes: 2 per launch


def test_marker_arguments_are_checked(tmp_path):
    (tmp_path / "test_bad.py").write_text("import pytest\n\n@pytest.mark.mpirun(0)\ndef test_x():\n    pass\n")
    r = run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mpidl.testing", "test_bad.py"],
            cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "@pytest.mark.mpirun(0): a rank count (a positive int) or a list of them" in r.output


@pytest.mark.mpirun(2)
def test_mpidl_suite_runs_on_the_plugin(world, shared_tmp_path):
    """This suite loads the plugin from conftest: a test of its own on two ranks."""
    assert world.size == 2 and world.launcher == "mpirun"
    assert shared_tmp_path.is_dir()
    assert subprocess.run(["true"]).returncode == 0  # a rank may start processes of its own


@pytest.mark.mpi  # its child starts mpirun
def test_the_docs_example_passes(tmp_path):
    """docs/testing.md's user test file, as printed there, on its ranks."""
    page = (ROOT / "docs" / "testing.md").read_text()
    code = page.split("```python\n# tests/test_my_loop.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "test_my_loop.py").write_text(code)
    r = run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mpidl.testing", "-rA",
             f"--basetemp={tmp_path / 'tmp'}", "test_my_loop.py"], cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.output[-3000:]
    passed = sorted(line.split()[1] for line in r.stdout.splitlines() if line.startswith("PASSED "))
    assert passed == ["test_my_loop.py::test_allreduce_sums", "test_my_loop.py::test_my_loop_resumes_exactly[np=1]",
                      "test_my_loop.py::test_my_loop_resumes_exactly[np=2]"], r.output[-3000:]
