"""Shared test helpers: launch real ranks with mpirun and collect what they print.

Tests that run their own code on ranks use mpidl's pytest plugin (`@pytest.mark.mpirun(N)`,
mpidl/testing.py), loaded here as `pip install mpidl` registers it for users; its ranks get
setup.cfg's `mpirun_env`, the same environment as `MPI_ENV` below gives the launches written
out here. The plugin also holds the `slurm_cluster` fixture.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MPIRUN = shutil.which("mpirun")

pytest_plugins = ["mpidl.testing"]

# setup.cfg's `mpirun_env` (read at configure): root needs OpenMPI's consent; 3 ranks on 2 cores
# need oversubscription; containers often forbid the cross-memory attach that vader's single
# copy uses; one thread per rank.
MPI_ENV: dict[str, str] = {}


def pytest_configure(config):
    from mpidl.testing import DIR_ENV, rank_env

    MPI_ENV.update(rank_env(config))
    if not os.environ.get(DIR_ENV):  # the guard watches the pytest process, not the plugin's ranks
        _make_mpirun_shim()


def pytest_unconfigure(config):
    if _SHIM_DIR:
        shutil.rmtree(_SHIM_DIR, ignore_errors=True)


# ------------------------------------------------------------------ tiers
#
# setup.cfg declares the markers; this hook applies them from what a test uses, so a new test
# lands in the right tier without anyone remembering to mark it (`make test-quick` deselects
# mpi, slurm, multinode, horovod and slow):
#   mpi        the plugin's @pytest.mark.mpirun, or code that reaches this file's `mpirun`/`MPIRUN`
#              (the test, its fixtures, and the module's functions they call)
#   slurm      the `slurm_cluster` or `two_nodes` fixture, or code reaching `sbatch_wait`,
#              `CLUSTER_SH` or `start_nodes`
#   multinode  the `two_nodes` fixture, or code reaching `start_nodes`
#   horovod    `@needs_horovod`, or a parameter whose value is "horovod"
# `slow` is given by hand (explicitly, in the test file). What the static look misses, the guard
# below catches at run time: a test that starts mpirun (itself, or through a child found on PATH)
# without the `mpi` marker fails.

REACHES = {
    "mpi": {"mpirun", "MPIRUN"},
    "slurm": {"sbatch_wait", "CLUSTER_SH", "start_nodes"},
    "multinode": {"start_nodes"},
}
FIXTURE_MARKS = {"slurm_cluster": ("slurm",), "two_nodes": ("slurm", "multinode")}


def _names_reached(funcs, module_globals: dict) -> set[str]:
    """The global names the code of `funcs` uses, following the functions of the module (or of
    this file) it calls, and code nested in it (inner functions, lambdas, comprehensions)."""
    import types

    names: set[str] = set()
    seen: set[int] = set()
    todo = [getattr(f, "__code__", None) for f in funcs]
    while todo:
        code = todo.pop()
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                todo.append(const)
        for name in code.co_names:
            names.add(name)
            target = module_globals.get(name, globals().get(name))
            target = getattr(target, "__wrapped__", target)
            if isinstance(target, types.FunctionType) and target.__module__ in (module_globals.get("__name__"), __name__):
                todo.append(target.__code__)
    return names


def tier_marks(item) -> set[str]:
    """The tier markers `item` earns from what it uses (see above)."""
    marks: set[str] = set()
    if item.get_closest_marker("mpirun") is not None:
        marks.add("mpi")
    for fixture, given in FIXTURE_MARKS.items():
        if fixture in getattr(item, "fixturenames", ()):
            marks.update(given)
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "horovod" in [v for v in callspec.params.values() if isinstance(v, str)]:
        marks.add("horovod")
    func = getattr(item, "function", None)
    module = getattr(item, "module", None)
    if func is not None and module is not None:
        funcs = [func]
        infos = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}) or {}
        for defs in infos.values():
            funcs += [d.func for d in defs if getattr(d, "func", None) is not None]
        names = _names_reached(funcs, vars(module))
        marks.update(mark for mark, wanted in REACHES.items() if names & wanted)
    return marks


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups, and before -m deselects by tier
def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in sorted(tier_marks(item)):
            if item.get_closest_marker(mark) is None:
                item.add_marker(mark)
        # `make test` runs the suite on parallel workers (pytest-xdist, --dist loadgroup): the tests
        # that use a SLURM cluster run on one worker, one after another, so each session's cluster
        # starts once and two clusters never start side by side
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.xdist_group("slurm"))
        # and the tests that share a module-scoped fixture of their file (a trained teacher, a
        # scaling study, a built wheel) run on one worker, so the fixture is made once, not once a worker
        elif item.get_closest_marker("xdist_group") is None and own_module_fixtures(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def own_module_fixtures(item) -> list[str]:
    """The module-scoped fixtures of `item`'s own test file that it uses (directly or not)."""
    module = getattr(item, "module", None)
    if module is None:
        return []
    infos = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}) or {}
    return sorted(name for name, defs in infos.items() for d in defs[-1:]  # the definition that applies
                  if d.scope == "module" and getattr(d.func, "__module__", None) == module.__name__)


# The guard. Children of `run` find this `mpirun` first on PATH: it notes the launch in the file
# MPIDL_TEST_LAUNCHES names, then runs the real one.
_SHIM_DIR: str | None = None
LAUNCHES = "MPIDL_TEST_LAUNCHES"


def _make_mpirun_shim() -> None:
    global _SHIM_DIR
    if MPIRUN is None or _SHIM_DIR is not None:
        return
    import tempfile

    _SHIM_DIR = tempfile.mkdtemp(prefix="mpidl-test-shim-")
    shim = Path(_SHIM_DIR) / "mpirun"
    shim.write_text(f'#!/bin/sh\n[ -n "${LAUNCHES}" ] && echo "mpirun $*" >> "${LAUNCHES}"\nexec "{MPIRUN}" "$@"\n')
    shim.chmod(0o755)


def unmarked_launch(item, launches: Path) -> str | None:
    """Why `item` fails the guard: it started mpirun (the lines in `launches`) without `mpi`."""
    if item.get_closest_marker("mpi") is not None or not launches.exists():
        return None
    lines = launches.read_text().splitlines()
    if not lines:
        return None
    return (f"{item.nodeid} starts mpirun but is not marked `mpi` (tests/conftest.py's tier_marks did not see "
            f"it: add @pytest.mark.mpi): {lines[0][:200]}")


@pytest.fixture(autouse=True)
def _mpirun_guard(request):
    if _SHIM_DIR is None:
        yield
        return
    launches = Path(_SHIM_DIR) / "launches"
    launches.unlink(missing_ok=True)
    os.environ[LAUNCHES] = str(launches)
    try:
        yield
    finally:
        os.environ.pop(LAUNCHES, None)
    why = unmarked_launch(request.node, launches)
    launches.unlink(missing_ok=True)
    if why:
        pytest.fail(why, pytrace=False)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def clean_env(extra: dict | None = None) -> dict:
    """The environment a test's child sees: no launcher variables leaking in from outside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "SLURM_"))}
    env.update(MPI_ENV)
    if _SHIM_DIR:
        env["PATH"] = _SHIM_DIR + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


def run(cmd: list[str], *, timeout: float = 120, env: dict | None = None, cwd: Path | str | None = None) -> Ran:
    t0 = time.monotonic()
    if cmd and os.path.basename(str(cmd[0])) == "mpirun" and os.environ.get(LAUNCHES):
        with open(os.environ[LAUNCHES], "a") as f:
            f.write("mpirun " + " ".join(map(str, cmd[1:])) + "\n")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(env),
                       cwd=cwd or ROOT)
    return Ran(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def sbatch_wait(script: Path | str, *, env: dict, cwd: Path | str | None = None,
                timeout: float = 600) -> tuple[str, str]:
    """Submit a batch script and wait for its end: (job id, "State ExitCode" as scontrol tells them).
    Polls scontrol twice a second; `sbatch --wait` polls ever more slowly (tens of seconds a job)."""
    from mpidl.slurm.controller import FINAL_STATES

    r = run(["sbatch", "--parsable", str(script)], env=env, cwd=cwd)
    assert r.returncode == 0, r.output
    job = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = dict(f.split("=", 1) for f in run(["scontrol", "-o", "show", "job", job], env=env).stdout.split()
                    if "=" in f)
        if info.get("JobState") in FINAL_STATES:
            return job, f"{info['JobState']} {info.get('ExitCode')}"
        time.sleep(0.5)
    run(["scancel", job], env=env)
    raise AssertionError(f"batch job {job} did not end within {timeout:.0f} s")


def mpirun(np_: int, args: list[str], *, timeout: float = 180, env: dict | None = None,
           cwd: Path | str | None = None) -> Ran:
    """`mpirun -np N <args>` with a hard timeout: a hang fails the test instead of CI."""
    if MPIRUN is None:
        pytest.skip("mpirun not installed")
    return run([MPIRUN, "-np", str(np_), *args], timeout=timeout, env=env, cwd=cwd)


def mpidl_cmd(*args: str) -> list[str]:
    """The CLI as a rank runs it."""
    return [PYTHON, "-m", "mpidl.cli", *args]


# A launched script's process is as the `mpidl` command's (cli.entry, mpidl/startup.py): what lives
# at exit is frozen, and a job it runs loads torch with the collector off. On one line: a traceback's
# line numbers stay the script's own.
_AS_MPIDL = "from mpidl import startup as _startup; _startup.claim(); del _startup; "


def pycode(code: str) -> list[str]:
    return [PYTHON, "-c", _AS_MPIDL + code]


def results(r: Ran) -> list:
    """The JSON after each "RESULT " line a launched script printed, in order."""
    return [json.loads(line[len("RESULT "):]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]


# `mpidl` commands in turn in one process (`cli.main`), on the same ranks: a launch costs
# seconds of start (Python, torch, Horovod, MPI), a small run a second or two.
_IN_TURN = """
import json, sys
from mpidl import cli

for argv in json.loads(sys.argv[1]):
    assert cli.main(argv) == 0, argv
"""


def cli_in_turn(np_: int, argvs: list[list[str]], *, timeout: float = 300, cwd: Path | str | None = None) -> Ran:
    """Each `mpidl` argv run to success in turn by one launch of `np_` ranks (1: one process, no launcher)."""
    cmd = pycode(_IN_TURN) + [json.dumps(argvs)]
    r = mpirun(np_, cmd, timeout=timeout, cwd=cwd) if np_ > 1 else run(cmd, timeout=timeout, cwd=cwd)
    assert r.returncode == 0, r.output[-3000:]
    return r


# Bad input case by case in one launch: each argv through mpidl's own parser and command on
# every rank, and what each rank raised (a command's exit 2 is tested by one launch of its own).
_RAISES = """
import json, sys, mpidl
from mpidl.cli import build_parser
from mpidl.errors import BadInput
w = mpidl.init()
out = []
for argv in json.loads(sys.argv[1]):
    parsed = build_parser().parse_args(argv)
    try:
        parsed.func(parsed)
        out.append(None)
    except BadInput as e:
        out.append([str(e), e.collective])
res = w.comm.gather(out, root=0)
if w.rank == 0:
    print("RESULT " + json.dumps(res), flush=True)
"""


def bad_input_lines(np_: int, argvs: list[list[str]], *, cwd: Path | str, timeout: float = 300) -> list[str]:
    """The line each `mpidl` argv's bad input raises, run in turn by the same `np_` ranks: every
    rank raises it, the same one line, collectively (so rank 0 alone prints it), no traceback."""
    r = mpirun(np_, pycode(_RAISES) + [json.dumps(argvs)], cwd=cwd, timeout=timeout)
    assert r.returncode == 0, r.output[-3000:]
    (per_rank,) = results(r)
    lines = []
    for i, argv in enumerate(argvs):
        raised = [ranks[i] for ranks in per_rank]
        assert all(x is not None for x in raised), (argv, raised)
        assert len({msg for msg, _ in raised}) == 1, (argv, raised)  # the same line on every rank
        assert all(collective for _, collective in raised), (argv, raised)
        assert "\n" not in raised[0][0] and "Traceback" not in raised[0][0], (argv, raised[0][0])
        lines.append(raised[0][0])
    return lines


def has_horovod() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except Exception:
        return False
    return True


def needs_horovod(test):
    """Runs only where Horovod imports; marked `horovod`, so `pytest -m horovod` selects it."""
    return pytest.mark.horovod(pytest.mark.skipif(not has_horovod(), reason="Horovod is not installed")(test))


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def needs_cuda(test):
    """Runs only where CUDA works; marked `gpu`, so `pytest -m gpu` selects every such test."""
    return pytest.mark.gpu(pytest.mark.skipif(not has_cuda(), reason="no CUDA device")(test))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ emulated nodes

CLUSTER_SH = str(ROOT / "slurm" / "cluster.sh")


def multinode_unavailable() -> str | None:
    """Why `cluster.sh start --nodes 2` cannot run here, or None."""
    if os.geteuid() != 0:
        return "emulated nodes need root (network namespaces)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"emulated nodes need '{tool}'"
    if shutil.which("slurmctld") is None or shutil.which("srun") is None:
        return "SLURM is not installed (as root: bash slurm/cluster.sh install)"
    return None


@dataclass
class Nodes:
    """A running `cluster.sh start --nodes N`: its state folder, client env, and what it made."""

    dir: Path
    env: dict
    subnet: str
    made: list[tuple[str, str]]

    def netns(self, node: str) -> str:
        return next(what for kind, what in self.made if kind == "netns" and what.endswith("-" + node))

    def pids_on(self, node: str, marker: str = "") -> list[int]:
        """Processes running inside `node` (its network namespace) whose command line holds `marker`."""
        ino = os.stat(f"/run/netns/{self.netns(node)}").st_ino
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino != ino:
                    continue
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry))
        return found

    def leftovers(self) -> list[str]:
        """What of this cluster still exists: namespaces, links, mounts, live daemons."""
        left = []
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        mounts = Path("/proc/mounts").read_text()
        for kind, what in self.made:
            if kind == "netns" and what in netns.split():
                left.append(f"namespace {what}")
            elif kind == "link" and (f" {what}:" in links or f" {what}@" in links):
                left.append(f"link {what}")
            elif kind in ("uts", "mnt", "mount") and f" {what} " in mounts:
                left.append(f"mount {what}")
            elif kind == "pidfile" and Path(what).exists():
                pid = Path(what).read_text().strip()
                if pid.isdigit() and Path(f"/proc/{pid}").exists():
                    left.append(f"process {pid} ({what})")
        return left


def start_nodes(state: Path, n: int) -> Nodes:
    env = {"MPIDL_SLURM_DIR": str(state), "MPIDL_SLURMCTLD_PORT": str(_free_port()),
           "MPIDL_SLURMD_PORT": str(_free_port())}
    started = run(["bash", CLUSTER_SH, "start", "--nodes", str(n)], env=env, timeout=120)
    made = [tuple(line.split(" ", 1)) for line in (state / "made").read_text().splitlines()] \
        if (state / "made").exists() else []
    nodes = Nodes(state, {**env, "SLURM_CONF": str(state / "slurm.conf")},
                  (state / "subnet").read_text().strip() if (state / "subnet").exists() else "", made)
    if started.returncode != 0:
        stop_nodes(nodes)
        raise AssertionError(started.output)
    return nodes


def reap_dead_clusters(root: Path) -> list[Path]:
    """Stop the emulated clusters an earlier, killed test session left under `root` (pytest's
    folder of sessions): their namespaces and links outlive them. Only those none of whose
    daemons still runs; the state folders stopped."""
    reaped: list[Path] = []
    if not root.name.startswith("pytest-of-"):
        return reaped  # a --basetemp of the user's: not ours to search
    for made in sorted({p.resolve() for pattern in ("*/*/made", "*/*/*/made") for p in root.glob(pattern)}):
        pidfiles = [line.split(" ", 1)[1] for line in made.read_text().splitlines() if line.startswith("pidfile ")]
        pids = [Path(f).read_text().strip() for f in pidfiles if Path(f).exists()]
        if any(pid.isdigit() and Path(f"/proc/{pid}").exists() for pid in pids):
            continue  # alive: another session's
        run(["bash", CLUSTER_SH, "stop"], env={"MPIDL_SLURM_DIR": str(made.parent)}, timeout=90)
        reaped.append(made.parent)
    return reaped


def stop_nodes(nodes: Nodes) -> list[str]:
    """Stop the cluster; what it left behind (should be nothing)."""
    run(["bash", CLUSTER_SH, "stop"], env=nodes.env, timeout=90)
    return nodes.leftovers()


@pytest.fixture(scope="session")
def two_nodes(tmp_path_factory):
    """Two emulated compute nodes (node1, node2) under one SLURM controller, shared by the session.

    Skips where they cannot run (not root, no iproute2, no SLURM). Teardown fails the session if
    anything the cluster made is left behind.
    """
    why = multinode_unavailable()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.getbasetemp()  # pytest-of-USER/pytest-N, or a worker's folder in it
    reap_dead_clusters(next((p for p in base.parents if p.name.startswith("pytest-of-")), base.parent))
    nodes = start_nodes(tmp_path_factory.mktemp("nodes"), 2)
    try:
        yield nodes
    finally:
        left = stop_nodes(nodes)
        assert not left, f"cluster.sh stop left {left}"
