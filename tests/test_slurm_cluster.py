"""slurm/cluster.sh trusts nothing it did not make: a state folder another user could have made
or changed is refused in one line, and a pid file never gets a process killed that is not the
daemon the script started. Emulated nodes are in test_multinode.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLUSTER_SH, _free_port, run

UID = os.getuid()


def cluster(*args: str, env: dict, timeout: float = 60):
    return run(["bash", CLUSTER_SH, *args], env=env, timeout=timeout)


@pytest.fixture
def sleeper():
    """A process of ours that no `stop` may end."""
    p = subprocess.Popen(["sleep", "300"])
    yield p
    p.kill()
    p.wait()


def plant(d: Path, how: str) -> None:
    if how == "other owner":
        if UID != 0:
            pytest.skip("chown to another user needs root")
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)
    elif how == "mode 777":
        d.mkdir()
        os.chmod(d, 0o777)
    else:
        target = d.with_name("target")
        target.mkdir(mode=0o700)
        d.symlink_to(target)


PLANTED = [("other owner", f"owned by uid 65534, not by the caller (uid {UID})"),
           ("mode 777", "mode 777: group or others may use it (it must be 700)"),
           ("symlink", "a symbolic link, not a folder")]


@pytest.mark.parametrize("how,why", PLANTED)
def test_start_refuses_a_state_folder_not_the_callers_alone(tmp_path, how, why):
    d = tmp_path / "c"
    plant(d, how)
    r = cluster("start", env={"MPIDL_SLURM_DIR": str(d) + "/"})
    assert r.returncode == 2 and r.stdout == "", r.output
    assert r.stderr.splitlines() == [f"[slurm] error: MPIDL_SLURM_DIR={d}: {why}"]
    assert list(d.iterdir()) == []  # no slurm.conf written there for the daemons to read


def test_stop_acts_on_nothing_in_a_folder_another_user_made(tmp_path, sleeper):
    """The reported attack: a folder made first by someone else, naming a pid and a file."""
    d, victim = tmp_path / "c", tmp_path / "victim"
    victim.write_text("keep me")
    (d / "run").mkdir(parents=True, mode=0o700)
    for name in ("slurmctld", "slurmd", "munged"):
        (d / "run" / f"{name}.pid").write_text(f"{sleeper.pid}\n")
    (d / "made").write_text(f"uts {victim}\npidfile {d}/run/slurmd.pid\n")
    os.chmod(d, 0o700)
    if UID == 0:
        os.chown(d, 65534, 65534)
    else:
        os.chmod(d, 0o777)
    r = cluster("stop", env={"MPIDL_SLURM_DIR": str(d)})
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.output
    assert r.stderr.startswith(f"[slurm] error: MPIDL_SLURM_DIR={d}: ")
    time.sleep(0.2)
    assert sleeper.poll() is None and victim.read_text() == "keep me"


def test_stop_ends_only_the_daemons_it_started(tmp_path, sleeper):
    """In our own folder: pid files naming other processes (one even called slurmctld, but not
    with our config), and `made` lines naming things outside this cluster, are left alone."""
    d, victim = tmp_path / "c", tmp_path / "victim"
    victim.write_text("keep me")
    (d / "run").mkdir(parents=True)
    os.chmod(d, 0o700)
    posing = subprocess.Popen(["bash", "-c", "exec -a slurmctld sleep 300"])
    try:
        for _ in range(50):
            if Path(f"/proc/{posing.pid}/cmdline").read_bytes().startswith(b"slurmctld\0"):
                break
            time.sleep(0.05)
        pids = {"slurmctld": posing.pid, "slurmd": sleeper.pid, "munged": sleeper.pid,
                "slurmd-node1": sleeper.pid}
        for name, pid in pids.items():
            (d / "run" / f"{name}.pid").write_text(f"{pid}\n")
        (d / "made").write_text(f"pidfile {d}/run/slurmd-node1.pid\npidfile {d}/run/slurmctld.pid\n"
                                f"uts {victim}\nmnt {d}/../victim\nnetns mpidl-not-this-cluster\n")
        r = cluster("stop", env={"MPIDL_SLURM_DIR": str(d)})
        assert r.returncode == 0 and r.stdout == "[slurm] stopped\n", r.output
        assert f"left alone: uts {victim}" in r.stderr and f"left alone: mnt {d}/../victim" in r.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None and posing.poll() is None and victim.read_text() == "keep me"
    finally:
        posing.kill()
        posing.wait()


def default_env(tmp_path: Path) -> dict:
    """No MPIDL_SLURM_DIR: the folder `start` makes, noted under HOME."""
    (tmp_path / "home").mkdir(mode=0o700, exist_ok=True)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {"MPIDL_SLURM_DIR": "", "XDG_RUNTIME_DIR": "", "HOME": str(tmp_path / "home"),
            "TMPDIR": str(tmp_path / "tmp")}


@pytest.mark.parametrize("planted", ["note names another user's folder", "note folder open to others"])
def test_the_default_folder_is_refused_when_its_note_is_not_trustworthy(tmp_path, planted):
    env = default_env(tmp_path)
    note = tmp_path / "home" / ".cache" / "mpidl-slurm-dir"
    note.parent.mkdir(mode=0o700)
    if planted == "note names another user's folder":
        if UID != 0:
            pytest.skip("chown to another user needs root")
        other = tmp_path / "tmp" / "theirs"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, 65534)
        note.write_text(f"{other}\n")
        why = f"state folder {other} (noted in {note}): owned by uid 65534, not by the caller (uid {UID})"
    else:
        os.chmod(note.parent, 0o777)
        why = (f"{note.parent}: owned by uid {UID}, mode 777: others could change the note of the state "
               f"folder there; set MPIDL_SLURM_DIR")
    for cmd in ("start", "stop"):
        r = cluster(cmd, env=env)
        assert r.returncode == 2 and r.stderr.splitlines() == [f"[slurm] error: {why}"], (cmd, r.output)
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == (
        ["theirs"] if planted.startswith("note names") else [])


def test_the_default_folder_is_private_and_found_again_by_stop(tmp_path):
    if shutil.which("slurmctld") is None or shutil.which("srun") is None:
        pytest.skip("SLURM is not installed (as root: bash slurm/cluster.sh install)")
    env = {**default_env(tmp_path), "MPIDL_SLURMCTLD_PORT": str(_free_port()), "MPIDL_SLURMD_PORT": str(_free_port())}
    nothing = cluster("stop", env=env)
    assert nothing.returncode == 0 and "nothing ran" in nothing.stdout, nothing.output
    started = cluster("start", env=env, timeout=90)
    try:
        assert started.returncode == 0, started.output
        d = Path((tmp_path / "home" / ".cache" / "mpidl-slurm-dir").read_text().strip())
        assert d.parent == tmp_path / "tmp" and d.name.startswith(f"mpidl-slurm-{UID}.")
        assert len(d.name) > len(f"mpidl-slurm-{UID}.") + 6  # mktemp's random part: not guessable
        assert (d.stat().st_mode & 0o777) == 0o700 and ((d / "slurm.conf").stat().st_mode & 0o077) == 0
        assert cluster("env", env=env).stdout == f"export SLURM_CONF={d}/slurm.conf\n"
        pids = [int((d / "run" / f"{name}.pid").read_text()) for name in ("slurmctld", "slurmd")]
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    finally:
        stopped = cluster("stop", env=env)
    assert stopped.returncode == 0 and stopped.stdout == "[slurm] stopped\n", stopped.output
    for _ in range(100):  # stop sends TERM; slurmctld saves its state first
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            break
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
