"""Node-local staging: each rank's fixed share of a source, copied once per node to a local disk.

    data.stage_dir: /local/scratch       a folder; environment variables and ~ are expanded
    data.stage_dir: $SLURM_TMPDIR/stage  (an unset variable is refused, never read as empty)
    data.stage_dir: auto                 $SLURM_TMPDIR, else $TMPDIR, else the system temp dir

Files go into `mpidl-<uid>` under that folder: made mode 0700, or, if it is there already, it
must be a real folder (not a symbolic link) of this user's that no group or other may use;
anything else is refused in one line. Other users can then neither plant a file we would read
nor replace one we wrote, and every file is written under a private temporary name (O_EXCL) and
renamed into place, so a reader never sees half a file.

A file is named after the source (paths, sizes, mtimes), batch, seed, rank, world size and the
job: SLURM's job (and step) id, or outside SLURM the pid of the node's stager, so a file is never
taken from another job; a requeued job (same SLURM id) may reuse what it staged before it was
stopped. Before reuse its rows are hashed again and compared with the digest written at staging
(`mpidl_sha256`): a file cut short, damaged or edited since is staged again, with a warning from
the node's local rank 0. Each rank removes its own file when the loader is closed, or when the
process ends normally without that.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import weakref
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mpidl import log, watchdog
from mpidl.data.layout import H5Source
from mpidl.data.shard import plan_rank, steps_per_epoch
from mpidl.errors import BadInput

AUTO = "auto"
STAGE_EPOCH = 2**32 - 1   # the seed-only order that picks each rank's staged share
HASH_BYTES = 16 << 20     # rows hashed per read when checking a file before reuse
_VAR = re.compile(r"\$(?:(\w+)|\{(\w+)\})")


def resolve(value: str) -> Path:
    """data.stage_dir as a path: `auto`, or the value with environment variables and ~ expanded."""
    if value == AUTO:
        for var in ("SLURM_TMPDIR", "TMPDIR"):
            if os.environ.get(var):
                return Path(os.environ[var])
        return Path(tempfile.gettempdir())
    for m in _VAR.finditer(value):
        name = m.group(1) or m.group(2)
        if not os.environ.get(name):  # an empty one would turn "$TMPDIR/stage" into "/stage"
            raise BadInput(f"data.stage_dir {value!r}: ${name} is not set here")
    return Path(os.path.expanduser(os.path.expandvars(value)))


def private_dir(base: Path, value: str) -> Path:
    """`base/mpidl-<uid>`, made 0700, or checked to be a folder only this user can use."""
    uid = os.getuid()
    path = base / f"mpidl-{uid}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # ours from an earlier run, another rank's just now, or planted: checked below
        st = os.lstat(path)
    except OSError as e:
        raise BadInput(f"data.stage_dir {value!r}: cannot make {path}: {e.strerror}") from None
    why = _not_private(st, uid)
    if why:
        raise BadInput(f"data.stage_dir {value!r}: {path} {why}; remove it or choose another stage_dir")
    return path


def _not_private(st: os.stat_result, uid: int) -> Optional[str]:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link, not a folder"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):04o}: group or others may use it (it must be 0700)"
    return None


def _job() -> str:
    """This job's part of a file name (see the module doc); only [A-Za-z0-9_.-] of SLURM's ids."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return f"p{os.getpid()}"
    step = os.environ.get("SLURM_STEP_ID")  # concurrent steps of one job each stage their own
    return re.sub(r"[^\w.-]", "_", f"j{job}" + (f".{step}" if step else ""))


class _Digest:
    """SHA-256 of the staged rows, one running hash per key (rows in file order), combined with
    each key's name, dtype and shape. Hashing as the rows are written costs a fraction of reading
    them from the source; checking a file before reuse reads it once from the local disk, less
    than staging it again from shared storage."""

    def __init__(self, keys: Sequence[str]):
        self.keys = keys
        self.parts = {k: hashlib.sha256() for k in keys}

    def update(self, key: str, rows: np.ndarray) -> None:
        self.parts[key].update(np.ascontiguousarray(rows).data)

    def hexdigest(self, shapes: dict, dtypes: dict) -> str:
        h = hashlib.sha256()
        for k in self.keys:
            h.update(f"{k}|{np.dtype(dtypes[k]).str}|{tuple(shapes[k])}|{self.parts[k].hexdigest()}|".encode())
        return h.hexdigest()


class Staging:
    """This rank's share of `source` for a loader, staged under data.stage_dir (see the module doc).

    The folder is made or checked on every rank here (a collective: every rank refuses together);
    `share()` stages, on the node's local rank 0, the file of every rank on its node.
    """

    def __init__(self, value: str, source: H5Source, world, batch: int, seed: int, block: int, window: int,
                 shuffle: str):
        self.value, self.source, self.world = value, source, world
        self.batch, self.seed, self.block, self.window, self.shuffle = batch, seed, block, window, shuffle
        self.folder = world.agree(lambda: private_dir(resolve(value), value))
        self.job: Optional[str] = None
        self.staged: Optional[H5Source] = None
        self._remove: Optional[weakref.finalize] = None
        self.rows = steps_per_epoch(len(source), world.size, batch, drop_last=True) * batch

    def path(self, rank: int) -> Path:
        assert self.job is not None, "share() names the job"
        name = (f"mpidl-stage-{self.source.signature()}-b{self.batch}-s{self.seed}"
                f"-r{rank}of{self.world.size}-{self.job}.h5")
        return self.folder / name

    def share(self) -> H5Source:
        """This rank's staged rows; the first call stages them (a collective on the node).

        The node's local rank 0 copies the share of every rank on its node (each to its own file)
        while the node's other ranks wait for it: the source is read by one process per node, and
        a node-local disk is written by one.
        """
        if self.staged is not None:
            return self.staged
        if self._remove is not None:
            raise RuntimeError("the loader was closed: its staged rows are gone")
        w = self.world
        node = w.node_comm if w.local_size > 1 else None
        mine = (w.rank, _job() if w.local_rank == 0 else None)
        with watchdog.waiting("the node's ranks, before staging"):
            here = node.allgather(mine) if node is not None else [mine]
        self.job = here[0][1]  # the stager's: one name on every rank of the node
        if w.local_rank == 0:
            for rank, _ in here:
                path = self.path(rank)
                # a check of a staged file reads it whole in one call (LONG); a copy marks each block
                with watchdog.phase("staging", f"checking the staged file {path}", factor=watchdog.LONG):
                    reusable = self._reusable(path)
                if not reusable:
                    with watchdog.phase("staging", f"copying rank {rank}'s rows to {path}"):
                        self._copy(rank, path)
        if node is not None:
            with watchdog.waiting(f"staging by the node's local rank 0 (rank {here[0][0]})"):
                node.Barrier()
        path = self.path(w.rank)
        self._remove = weakref.finalize(self, _unlink, path)  # at close(), or at a normal exit
        self.staged = H5Source(str(path), keys=self.source.keys).validate()
        return self.staged

    def remove(self) -> None:
        """Remove this rank's file (each rank its own: no collective)."""
        self.staged = None
        if self._remove is not None:
            self._remove()

    def _reusable(self, path: Path) -> bool:
        """True where `path` holds exactly the rows staged there (see _Digest); else it goes."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        why = None
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            why = "is not a file of this user's"
        else:
            try:
                why = self._differs(path)
            except OSError as e:
                why = f"cannot be read ({e})"
        if why is None:
            return True
        log.get().warning("staged file %s %s: staging it again", path, why)
        if not stat.S_ISDIR(st.st_mode):
            path.unlink()
        return False

    def _differs(self, path: Path) -> Optional[str]:
        import h5py

        src = self.source
        with h5py.File(path, "r") as f:
            expect = f.attrs.get("mpidl_sha256")
            if expect is None:
                return "has no content digest"
            for k in src.keys:
                if k not in f or f[k].shape != (self.rows, *src.shapes[k]) or f[k].dtype != src.dtypes[k]:
                    return f"does not hold {self.rows} rows of '{k}' as the source stores them"
            digest = _Digest(src.keys)
            for k in src.keys:
                step = max(1, HASH_BYTES // max(1, src.row_bytes_of(k)))
                for a in range(0, self.rows, step):
                    digest.update(k, f[k][a:a + step])
        if digest.hexdigest(src.shapes, src.dtypes) != expect:
            return "does not match its content digest"
        return None

    def _copy(self, rank: int, path: Path) -> None:
        import h5py

        from mpidl.data.loader import _coalesce  # not at the top: the loader imports this module

        src, w = self.source, self.world
        # The share: the rank's rows of a seed-only block order, read once from the source.
        share = plan_rank(len(src), w.size, rank, self.batch, self.seed, STAGE_EPOCH, block=self.block,
                          window=self.window, drop_last=True, shuffle="block" if self.shuffle != "none" else "none")
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=path.name + ".", suffix=".tmp")  # O_EXCL, 0600
        os.close(fd)
        try:
            digest = _Digest(src.keys)
            with src.open() as reader, h5py.File(tmp, "w") as out:
                out.attrs["mpidl_staged_by"] = f"{w.host} rank {w.rank}"
                dsets = {k: out.create_dataset(k, (self.rows, *src.shapes[k]), src.dtypes[k]) for k in src.keys}
                pos = 0
                for win in share.windows:
                    for a, b in _coalesce(win.ranges):
                        for k in src.keys:
                            part = np.empty((b - a, *src.shapes[k]), src.dtypes[k])
                            reader.read(k, a, b, part)
                            dsets[k][pos:pos + b - a] = part
                            digest.update(k, part)
                        pos += b - a
                        watchdog.touch()
                assert pos == self.rows, (pos, self.rows)
                out.attrs["mpidl_sha256"] = digest.hexdigest(src.shapes, src.dtypes)
            os.replace(tmp, path)
        except BaseException:
            _unlink(Path(tmp))
            raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
