"""The pytest plugin for your own distributed code: a test function on N ranks under `mpirun`,
its result in the one pytest session that collected it. `pip install mpidl` registers it.

    import pytest

    @pytest.mark.mpirun(2)                       # mpirun([1, 2, 4]): once per rank count
    def test_allreduce(world):
        assert world.comm.allreduce(world.rank + 1) == 3

    @pytest.mark.mpirun(2, timeout=60)
    def test_my_loop(world, run_dir, h5_file):   # run_dir: the same folder on every rank
        ...

How: the pytest process stays out of MPI. At the first marked test of a run of consecutive
marked tests of one module and one rank count, it starts `mpirun -np N python -m pytest` on
all of them (one launch for the group: the imports and MPI's start are paid once), and reads
what each rank writes per test into a folder of the launch (its start, and its reports as
pytest serialises them for xdist). Each test then reports as soon as every rank finished it:

- a failed assertion or an exception on one rank fails the test with that rank's message
  (`[rank 1] AssertionError: ...`) and its captured output; that rank then ends the launch at
  once (MPI_Abort), so ranks waiting for it in a collective are not left hanging (fail-fast);
- a test still running after its timeout (`timeout=` on the marker, `--mpirun-timeout`, ini
  `mpirun_timeout`, default 120 s) fails with where each rank was (its Python stack, through
  faulthandler on SIGUSR1), and the launch is ended;
- a rank that dies (a segfault, os._exit) fails the test with mpirun's last lines;
- tests of the group after a failure run in a fresh launch: one test never fails another.

Fixtures on the ranks: `world` (mpidl.init()), `shared_tmp_path` (one empty folder, the same on
every rank), `run_dir` (a run folder in it, not yet made), `h5_file` (a small tabular HDF5 file
written by all ranks together). In the pytest process: `slurm_cluster`, the local SLURM
controller and node of the checkout's slurm/cluster.sh, for tests that submit jobs (skipped
where SLURM is not installed). Options: `--mpirun-isolate` (one launch per test),
`--mpirun-timeout S`; ini `mpirun_args` (more arguments for mpirun, e.g. `--bind-to none`) and
`mpirun_env` (KEY=VALUE lines for the ranks, e.g. `OMP_NUM_THREADS=1`).
"""
from __future__ import annotations

import faulthandler
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

MARK = "mpirun"
DIR_ENV = "MPIDL_PYTEST_DIR"       # set for the ranks: where each writes what it ran
DEFAULT_TIMEOUT_S = 120.0
STARTUP_S = 120.0                  # a launch's imports and collection, before its first test
KILL_GRACE_S = 5.0
EXIT_GRACE_S = 30.0                # a launch whose tests are done: MPI_Finalize and the atexit hooks
STACK_LINES = 15                   # of a timed-out rank's stack, innermost first
# The identity of a rank of an outer launch, which a launch of our own must not inherit.
LAUNCH_VARS = ("OMPI_COMM_WORLD", "PMIX_", "PMI_", "PYTEST_CURRENT_TEST", "PYTEST_XDIST")


# ------------------------------------------------------------------ registration
def pytest_addoption(parser) -> None:
    group = parser.getgroup("mpidl", "tests on mpirun ranks (mpidl)")
    group.addoption("--mpirun-timeout", type=float, default=None, metavar="S",
                    help=f"seconds a test marked mpirun may run (default: ini mpirun_timeout, {DEFAULT_TIMEOUT_S:.0f})")
    group.addoption("--mpirun-isolate", action="store_true",
                    help="one mpirun launch per test (default: one per run of tests of a module and rank count)")
    parser.addini("mpirun_timeout", default=str(DEFAULT_TIMEOUT_S), help="seconds a test marked mpirun may run")
    parser.addini("mpirun_args", type="args", default=[], help="more arguments for mpirun, e.g. --bind-to none")
    parser.addini("mpirun_env", type="linelist", default=[],
                  help="KEY=VALUE lines for the ranks' environment (yours wins where it sets the same key)")


def rank_env(config) -> dict[str, str]:
    """The ini's `mpirun_env` as a dict; a line without `=` is a usage error."""
    env = {}
    for line in config.getini("mpirun_env"):
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise pytest.UsageError(f"ini mpirun_env: expected KEY=VALUE, got {line!r}")
        env[key.strip()] = value.strip()
    return env


@pytest.hookimpl(tryfirst=True)  # before the tmp_path factory reads --basetemp
def pytest_configure(config) -> None:
    config.addinivalue_line("markers", f"{MARK}(np, timeout=None): run the test on np ranks under mpirun (a list "
                                       "of counts: once per count); timeout in seconds")
    folder = os.environ.get(DIR_ENV)
    if folder:
        from mpidl.world import env_rank

        rank = env_rank(os.environ)[0]
        # Each rank's own tmp_path, inside the launch's folder: the numbered folders pytest makes
        # (and prunes) under the system's temp dir are left to the pytest process.
        config.option.basetemp = str(Path(folder) / f"rank-{rank}" / "tmp")
        (Path(folder) / f"rank-{rank}").mkdir(parents=True, exist_ok=True)  # pytest makes only the leaf
        config.pluginmanager.register(_Rank(config, Path(folder), rank), "mpidl-rank")
    else:
        config.pluginmanager.register(_Parent(config), "mpidl-mpirun")


def _counts(mark) -> list[int]:
    value = mark.args[0] if mark.args else mark.kwargs.get("np", 2)
    counts = list(value) if isinstance(value, (list, tuple, range)) else [value]
    if not counts or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
        raise pytest.UsageError(f"@pytest.mark.{MARK}({value!r}): a rank count (a positive int) or a list of them")
    return counts


def pytest_generate_tests(metafunc) -> None:
    mark = metafunc.definition.get_closest_marker(MARK)
    if mark is None:
        return
    counts = _counts(mark)
    if len(counts) > 1:
        if "mpirun_np" not in metafunc.fixturenames:
            metafunc.fixturenames.append("mpirun_np")
        metafunc.parametrize("mpirun_np", counts, ids=[f"np={n}" for n in counts])


def _np(item) -> int:
    if item.get_closest_marker(MARK) is None:
        return 1  # a test in the pytest process
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "mpirun_np" in callspec.params:
        return callspec.params["mpirun_np"]
    return _counts(item.get_closest_marker(MARK))[0]


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def mpirun_np(request) -> int:
    """The rank count this test runs on (its `mpirun` marker's)."""
    return _np(request.node)


@pytest.fixture(scope="session")
def world():
    """This rank's `mpidl.World` (mpidl.init(): MPI started, fail-fast armed)."""
    import mpidl

    return mpidl.init()


@pytest.fixture
def shared_tmp_path(request, tmp_path_factory) -> Path:
    """An empty folder of this test, the same path on every rank (no collective: each rank makes
    it). Outside mpirun: a fresh temporary folder."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return tmp_path_factory.mktemp("shared")
    path = Path(folder) / "shared" / re.sub(r"[^\w.=-]+", "_", request.node.nodeid)[-120:]
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def run_dir(shared_tmp_path) -> Path:
    """A run folder for mpidl.Run or a job spec's `output`, in the shared folder (not made yet)."""
    return shared_tmp_path / "run"


@pytest.fixture
def h5_file(shared_tmp_path, world) -> Path:
    """A small HDF5 file on every rank (written by all together, a collective): `x` 512×8
    float32 features, `y` int64 labels in 4 classes from a known linear rule."""
    from mpidl.data import synth

    path = shared_tmp_path / "data.h5"
    synth.synth_tabular(str(path), 512, features=8, classes=4, seed=0, world=world)
    return path


def checkout_cluster_script() -> Optional[Path]:
    """slurm/cluster.sh of the checkout mpidl is installed from (an editable install's), or None."""
    import mpidl

    script = Path(mpidl.__file__).resolve().parents[1] / "slurm" / "cluster.sh"
    return script if script.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster (slurm/cluster.sh) for this test session, its node with 2
    emulated GPUs; yields the environment its client commands need (SLURM_CONF and the ports). In the pytest process,
    for tests that submit jobs; skipped where SLURM is not installed; stops what it started."""
    if os.environ.get(DIR_ENV):
        pytest.fail("slurm_cluster runs in the pytest process: use it from a test not marked mpirun")
    if shutil.which("slurmctld") is None or shutil.which("srun") is None:
        pytest.skip("SLURM is not installed (as root: bash slurm/cluster.sh install)")
    script = checkout_cluster_script()
    if script is None:
        pytest.skip("slurm/cluster.sh is not beside the mpidl package (an editable install of a checkout has it)")
    state = tmp_path_factory.mktemp("slurm")
    env = {"MPIDL_SLURM_DIR": str(state), "MPIDL_SLURMCTLD_PORT": str(_free_port()),
           "MPIDL_SLURMD_PORT": str(_free_port())}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", *LAUNCH_VARS))}
    # 2 emulated GPUs (SLURM's GRES counts; nothing on the node is a GPU): GPU job specs are placed
    # and judged by the controller as on a GPU node
    started = subprocess.run(["bash", str(script), "start", "--gpus", "2"], env={**base, **env}, capture_output=True,
                             text=True, timeout=90)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(script), "stop"], env={**base, **env}, capture_output=True, timeout=60)


# ------------------------------------------------------------------ on a rank
class _Rank:
    """In each rank's pytest: writes what runs and every report to rank-<r>.jsonl; a failure
    ends the whole launch at once."""

    def __init__(self, config, folder: Path, rank: int):
        self.config, self.rank = config, rank
        folder.mkdir(parents=True, exist_ok=True)
        self.out = open(folder / f"rank-{rank}.jsonl", "a", buffering=1)
        # Where this rank is, on the pytest process's request when a test runs past its timeout.
        self.stacks = open(folder / f"rank-{rank}.stack", "w")
        faulthandler.register(signal.SIGUSR1, file=self.stacks, all_threads=True)
        self._write({"event": "hello", "pid": os.getpid()})

    def _write(self, record: dict) -> None:
        self.out.write(json.dumps(record, default=str) + "\n")
        self.out.flush()

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self._write({"event": "start", "nodeid": nodeid})

    def pytest_runtest_logreport(self, report) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self._write({"event": "report", "nodeid": report.nodeid, "report": data})
        if report.failed:
            self._end_launch()

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self._write({"event": "collect-error", "nodeid": report.nodeid, "text": str(report.longrepr)})
            self._end_launch()

    def pytest_sessionfinish(self) -> None:
        self._write({"event": "done"})

    def _end_launch(self) -> None:
        """Fail-fast: the other ranks may wait for this one in a collective forever."""
        self.out.close()
        sys.stdout.flush()
        sys.stderr.flush()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.COMM_WORLD.Abort(1)
        os._exit(1)  # mpirun ends the others when a rank exits with an error


# ------------------------------------------------------------------ in the pytest process
class _Launch:
    """One `mpirun -np N python -m pytest TESTS...` and what its ranks wrote so far."""

    def __init__(self, items: list, np_: int, folder: Path, config):
        self.items, self.np, self.folder, self.config = list(items), np_, folder, config
        self.proc: Optional[subprocess.Popen] = None
        self.started_at = 0.0
        self.any_test_started = False
        self.records: dict[int, list[dict]] = {r: [] for r in range(np_)}
        self._offsets = {r: 0 for r in range(np_)}
        self._partial = {r: "" for r in range(np_)}

    @property
    def log(self) -> Path:
        return self.folder / "mpirun.log"

    def command(self) -> list[str]:
        mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
        if mpirun is None:
            raise _NoLauncher("mpirun (or mpiexec) is not on PATH")
        cfg = self.config
        # No colour: ranks write to mpirun's pseudo-terminals, and their reports are shown here.
        args = [mpirun, "-np", str(self.np), *cfg.getini("mpirun_args"), sys.executable, "-m", "pytest",
                "-p", __name__, "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "--no-header", "--color=no",
                "--code-highlight=no", "--rootdir", str(cfg.rootpath)]
        if cfg.inipath is not None:
            args += ["-c", str(cfg.inipath)]
        for plugin in cfg.option.plugins or []:
            if plugin not in (__name__, "no:cacheprovider", "no:xdist"):
                args += ["-p", plugin]
        return args + [_rank_nodeid(item) for item in self.items]

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**rank_env(self.config), **{k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}}
        env[DIR_ENV] = str(self.folder)
        env["PYTHONUNBUFFERED"] = "1"
        if self.np > (os.cpu_count() or 1):
            env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")  # Open MPI; others ignore it
        with open(self.log, "w") as log:
            # A session of its own: a timeout ends mpirun and every rank it started. An explicit
            # environment: a child inherits any MPI state the C environment of this process holds.
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=os.getcwd(), start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def read(self) -> None:
        for r in range(self.np):
            path = self.folder / f"rank-{r}.jsonl"
            try:
                with open(path) as f:
                    f.seek(self._offsets[r])
                    chunk = f.read()
                    self._offsets[r] = f.tell()
            except FileNotFoundError:
                continue
            text = self._partial[r] + chunk
            lines = text.split("\n")
            self._partial[r] = lines.pop()  # a line still being written
            for line in lines:
                if line.strip():
                    rec = json.loads(line)
                    self.records[r].append(rec)
                    self.any_test_started |= rec["event"] == "start"

    def of(self, nodeid: str) -> dict[int, list[dict]]:
        return {r: [x for x in recs if x.get("nodeid") == nodeid] for r, recs in self.records.items()}

    def outcome(self, nodeid: str) -> tuple[dict[int, list[dict]], list[int], list[int]]:
        """This test's reports per rank, the ranks it failed on, the ranks that finished it."""
        reports = {r: [x["report"] for x in recs if x["event"] == "report"] for r, recs in self.of(nodeid).items()}
        failed = [r for r, reps in reports.items() if any(x["outcome"] == "failed" for x in reps)]
        finished = [r for r, reps in reports.items() if any(x["when"] == "teardown" for x in reps)]
        return reports, failed, finished

    def settled(self, nodeid: str) -> bool:
        """Whether this test has its result here: finished on every rank, or failed on one."""
        _, failed, finished = self.outcome(nodeid)
        return bool(failed) or len(finished) == self.np

    def setup_seen(self, nodeid: str) -> bool:
        return any(x["when"] == "setup" for reps in self.outcome(nodeid)[0].values() for x in reps)

    def pids(self) -> dict[int, int]:
        return {r: recs[0]["pid"] for r, recs in self.records.items() if recs and recs[0]["event"] == "hello"}

    def stop(self) -> None:
        """End mpirun and every rank (TERM, then KILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def tail(self, chars: int = 3000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-chars:]

    def stacks(self, ranks: list[int]) -> str:
        """Where each of `ranks` is now: its main thread's Python stack (faulthandler, SIGUSR1)."""
        pids = self.pids()
        for r in ranks:
            if r in pids:
                try:
                    os.kill(pids[r], signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)
        out = []
        for r in ranks:
            try:
                text = (self.folder / f"rank-{r}.stack").read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            blocks = text.strip().split("\n\n")
            current = [b for b in blocks if b.startswith("Current thread")] or blocks[-1:]
            lines = current[-1].splitlines()[:STACK_LINES + 1] if current and current[-1] else ["  (no stack)"]
            out.append(f"rank {r}: " + "\n".join(lines))
        return "\n".join(out)


class _NoLauncher(Exception):
    pass


# A marked item's node id as collected, which its ranks know it by: pytest-xdist's --dist
# loadgroup adds an `@group` suffix to it in the pytest process afterwards.
_OWN_NODEID = pytest.StashKey[str]()


def _own_nodeid(item) -> str:
    return item.stash.get(_OWN_NODEID, item.nodeid)


def _rank_nodeid(item) -> str:
    """The item as the ranks' pytest is told it: its file by absolute path (they may start
    elsewhere), then the rest of its node id."""
    nodeid = _own_nodeid(item)
    rest = nodeid.split("::", 1)[1] if "::" in nodeid else ""
    return f"{item.path}::{rest}" if rest else str(item.path)


def _loadgroup(config) -> bool:
    """Whether pytest-xdist runs with --dist loadgroup (a worker sees its `loadgroup` option)."""
    return config.getoption("dist", None) == "loadgroup" or bool(getattr(config.option, "loadgroup", False))


def _may_split(config, items) -> bool:
    """Whether this is a pytest-xdist worker that may get some of a module's tests but not all:
    not --dist loadgroup, or a pytest on which loadgroup does not group (the `@group` suffix it
    adds to node ids does not take on pytest 9.2: pytest-xdist #1386)."""
    if not hasattr(config, "workerinput"):
        return False
    return not _loadgroup(config) or any(_own_nodeid(i) == i.nodeid for i in items if _OWN_NODEID in i.stash)


class _Parent:
    """Runs marked tests on ranks and reports them here."""

    def __init__(self, config):
        self.config = config
        self.launch_of: dict[str, _Launch] = {}
        self.groups: dict[str, list] = {}
        self.launches: list[_Launch] = []
        self.done: set[str] = set()
        self._n = 0

    def timeout(self, item) -> float:
        mark = item.get_closest_marker(MARK)
        if mark.kwargs.get("timeout") is not None:
            return float(mark.kwargs["timeout"])
        given = self.config.getoption("mpirun_timeout")
        return float(given if given is not None else self.config.getini("mpirun_timeout"))

    def pytest_itemcollected(self, item) -> None:
        if item.get_closest_marker(MARK) is None:
            return
        item.stash[_OWN_NODEID] = item.nodeid
        # Under pytest-xdist's --dist loadgroup a module's marked tests go to one worker, which
        # launches them together (the group's name is added before xdist reads it)
        if _loadgroup(self.config):
            item.add_marker(pytest.mark.xdist_group(f"mpirun:{item.nodeid.split('::')[0]}"))

    @pytest.hookimpl(trylast=True)  # after -k and -m have deselected
    def pytest_collection_modifyitems(self, session, config, items) -> None:
        # One launch per test where xdist may hand a module's tests to different workers: a launch
        # of several would run some of them a second time on another worker's ranks.
        isolate = config.getoption("mpirun_isolate") or _may_split(config, items)
        group: list = []

        def close() -> None:
            if group:
                start = items.index(group[0])
                group.sort(key=_np)  # stable: one launch per rank count in a run of marked tests
                items[start:start + len(group)] = group
                for n in sorted({_np(i) for i in group}):
                    members = [i for i in group if _np(i) == n]
                    for k in range(0, len(members), 1 if isolate else len(members)):
                        chunk = members[k:k + 1] if isolate else members
                        for i in chunk:
                            self.groups[i.nodeid] = chunk
                group.clear()

        for item in list(items):
            if item.get_closest_marker(MARK) is None:
                close()
            elif group and (item.path != group[0].path):
                close()
                group.append(item)
            else:
                group.append(item)
        close()

    def _launch_for(self, item) -> _Launch:
        launch = self.launch_of.get(item.nodeid)
        if launch is not None:
            launch.read()
            if launch.alive() or launch.settled(_own_nodeid(item)):
                return launch
        # Not launched yet, or its launch ended before this test had its result (a failure or a
        # timeout in an earlier test, where ranks that were not waiting went on to this one): a
        # fresh launch for this test and the rest of its group.
        group = self.groups.get(item.nodeid, [item])
        rest = [i for i in group[group.index(item):] if i.nodeid not in self.done]
        self._n += 1
        factory = getattr(self.config, "_tmp_path_factory", None)
        base = factory.getbasetemp() if factory is not None else Path(tempfile.mkdtemp(prefix="mpidl-pytest-"))
        launch = _Launch(rest, _np(item), base / "mpirun" / f"launch-{self._n}", self.config)
        for i in rest:
            self.launch_of[i.nodeid] = launch
        self.launches.append(launch)
        launch.start()
        return launch

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if item.get_closest_marker(MARK) is None:
            return None
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        try:
            reports = self.run(item)
        except _NoLauncher as e:
            reports = [_report(item, "setup", "skipped", (str(item.path), item.location[1] or 0, f"Skipped: {e}"))]
        self.done.add(item.nodeid)
        for rep in reports:
            ihook.pytest_runtest_logreport(report=rep)
        # Nothing of this test was set up here; what the next test does not share is torn down.
        call = pytest.CallInfo.from_call(lambda: item.session._setupstate.teardown_exact(nextitem), when="teardown")
        if call.excinfo is not None:
            ihook.pytest_runtest_logreport(report=pytest.TestReport.from_item_and_call(item, call))
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def run(self, item) -> list:
        launch = self._launch_for(item)
        nodeid = _own_nodeid(item)
        timeout = self.timeout(item)
        # The first test of a launch also waits for the imports, collection and the session's
        # fixtures (MPI's start, torch) on every rank.
        startup = 0.0 if launch.any_test_started else STARTUP_S
        waited_from = time.monotonic()
        setup_done: Optional[float] = None
        try:
            while True:
                alive = launch.alive()  # first: what a rank wrote before the launch ended is read next
                launch.read()
                reports, failed, finished = launch.outcome(nodeid)
                if len(finished) == launch.np or failed:
                    if failed:
                        launch.stop()  # the failing rank aborts the launch; make sure of it
                    return self.merge(item, launch, reports)
                if not alive:
                    return [self.crashed(item, launch, finished)]
                if setup_done is None and launch.setup_seen(nodeid):
                    setup_done = time.monotonic()
                # The timeout counts from the end of the test's set-up (a session's fixtures
                # start MPI and import torch in the first test of a launch); set-up itself gets
                # as long, plus the launch's start-up for the first.
                spent = time.monotonic() - (setup_done or waited_from)
                if spent > timeout + (0 if setup_done else startup):
                    return [self.timed_out(item, launch, timeout, finished)]
                time.sleep(0.02)
        except BaseException:
            launch.stop()  # interrupted (Ctrl-C, pytest-timeout): no rank outlives the session
            raise

    def merge(self, item, launch: _Launch, reports: dict) -> list:
        """One report per phase: the first failing rank's, else rank 0's."""
        out = []
        for when in ("setup", "call", "teardown"):
            per_rank = {r: x for r, reps in reports.items() for x in reps if x["when"] == when}
            if not per_rank:
                continue
            bad = [r for r in sorted(per_rank) if per_rank[r]["outcome"] == "failed"]
            r = bad[0] if bad else min(per_rank)
            rep = self.config.hook.pytest_report_from_serializable(config=self.config, data=per_rank[r])
            rep.nodeid = item.nodeid  # with xdist's group suffix, where it has one
            rep.duration = max(float(d.get("duration", 0.0)) for d in per_rank.values())
            if bad:
                _name_rank(rep, r, launch.np)
            out.append(rep)
            if bad:
                break
        return out

    def crashed(self, item, launch: _Launch, finished: list[int]) -> Any:
        rc = launch.proc.returncode if launch.proc else None
        quiet = [r for r in range(launch.np) if r not in finished]
        errors = [x for recs in launch.records.values() for x in recs if x["event"] == "collect-error"]
        if errors:
            text = f"collecting on the ranks failed:\n{errors[0]['text']}"
        elif not any(launch.of(_own_nodeid(item)).values()):
            text = (f"mpirun ended (exit status {rc}) before this test began on any rank"
                    + ("" if launch.records[0] else ": no rank started pytest") + "; its last lines:\n" + launch.tail())
        else:
            text = (f"rank(s) {', '.join(map(str, quiet))} of {launch.np} ended during this test (mpirun exit status "
                    f"{rc}); mpirun's last lines:\n{launch.tail()}")
        return _report(item, "call", "failed", text)

    def timed_out(self, item, launch: _Launch, timeout: float, finished: list[int]) -> Any:
        left = [r for r in range(launch.np) if r not in finished]
        where = launch.stacks(left)
        launch.stop()
        text = (f"timed out after {timeout:.0f} s on {launch.np} ranks (rank(s) {', '.join(map(str, left))} still in "
                f"the test); where each was:\n{where}")
        return _report(item, "call", "failed", text)

    def pytest_sessionfinish(self) -> None:
        for launch in self.launches:
            if launch.alive() and all(i.nodeid in self.done for i in launch.items):
                try:
                    assert launch.proc is not None  # alive() says it runs
                    launch.proc.wait(timeout=EXIT_GRACE_S)  # its ranks are leaving: let them
                except subprocess.TimeoutExpired:
                    pass
            launch.stop()


def _report(item, when: Literal["setup", "call", "teardown"], outcome: Literal["passed", "failed", "skipped"],
            longrepr) -> Any:
    return pytest.TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, outcome, longrepr, when)


def _name_rank(rep, rank: int, size: int) -> None:
    """The failure says which rank it came from: in the summary line and above the traceback."""
    lr = rep.longrepr
    crash = getattr(lr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None) is not None:
        crash.message = f"[rank {rank}] {crash.message}"
    if hasattr(lr, "addsection"):
        lr.addsection("mpirun", f"failed on rank {rank} of {size}; that rank ended the launch (fail-fast)")
    elif isinstance(lr, str):
        rep.longrepr = f"[rank {rank} of {size}] {lr}"
    elif isinstance(lr, tuple) and len(lr) == 3:  # a skip's (file, line, message)
        rep.longrepr = (lr[0], lr[1], f"[rank {rank}] {lr[2]}")
