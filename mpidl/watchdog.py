"""The progress watchdog: a rank that makes no progress for `watchdog_s` ends the whole job, named.

Every rank keeps one mark: what it is doing (a phase and a few words), since when, and whether it
is waiting for the other ranks in a collective. The Run, the Trainer, the loader, evaluation,
checkpoint writes, node-local staging and the backends set it at the points they pass anyway (a
tuple assignment: no lock, no communication). A daemon thread per rank looks at its own mark
twice a second:

- a rank whose mark is older than its allowance and that is *not* waiting is stuck: it asks the
  other ranks what they are doing (over a communicator of its own, answered by their watchdog
  threads, so a main thread blocked anywhere does not matter), prints one line naming the stuck
  rank(s), their hosts and what each was doing, then its Python stack (faulthandler), and ends
  the job with EXIT_STUCK;
- a rank that *waits* longer than its allowance asks the others: while one of them still makes
  progress (a long evaluation on one rank, rank 0 writing a checkpoint) it keeps waiting; a rank
  that does not answer (its process frozen, its node gone), a stuck rank that has not ended the
  job itself within GRACE_S, or every rank waiting (collectives that never match) ends the job,
  named the same way.

So the rank whose mark is oldest, the stuck one, fires first and names itself; the others only
say that they wait, and for what.

Allowances. `seconds` is `watchdog_s` (a job spec's key, a Run's keyword); None derives it from
the measured step time: max(FLOOR_S, STEP_FACTOR × the slowest mean step time of a metrics
record so far), the same on every rank (records are averaged over ranks); 0 turns the watchdog
off. A phase that cannot mark progress as it goes gets LONG × seconds: set-up (label scans,
generated data, model building, resume), the first step of a run (its first batch from a cold
file system, lazy initialisation), each torch.compile compilation (dynamo's own start and end
callbacks; at least COMPILE_S, as compile time has nothing to do with the step time), the fsync of
a checkpoint, a first held-out batch, and your own code outside `run.batches()`. Phases that
progress as they go mark each piece: the loader's reader thread per window and batch (counted
while the rank waits for data), evaluation per batch, a checkpoint per write, staging per block
copied.
"""
from __future__ import annotations

import atexit
import faulthandler
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Optional

from mpidl.errors import EXIT_STUCK

FLOOR_S = 120.0      # the derived watchdog_s is never shorter
STEP_FACTOR = 30     # ... and at least this many mean step times
LONG = 10            # allowance of the phases that cannot mark progress, in watchdog_s
COMPILE_S = 600.0    # a torch.compile compilation gets at least this (its time does not follow the step's)
TICK_S = 0.5         # how often each rank looks at its own mark
ANSWER_S = 5.0       # how long the other ranks' watchdogs have to answer a question
GRACE_S = 5.0        # a stuck rank that answers but has not ended the job by then is ended for
_QUERY, _ANSWER = 0x6D70, 0x6D71

_clock = time.monotonic


class Mark(NamedTuple):
    phase: str        # data, step, sync, optimizer, evaluation, checkpoint, staging, set-up, compile, ...
    detail: str       # a few words: "forward/backward of step 7"
    since: float      # monotonic seconds of the last progress in this phase
    factor: float     # the allowance, in watchdog_s
    waiting: bool     # in a collective, waiting for other ranks
    reads: bool       # the loader's reader thread making progress counts


_current: Optional["Watchdog"] = None


# ------------------------------------------------------------------ marks (cheap; no-ops without a watchdog)
def mark(phase: str, detail: str = "", factor: float = 1.0, reads: bool = False) -> None:
    """This rank now does `phase` (`detail`), with an allowance of `factor` × watchdog_s."""
    wd = _current
    if wd is not None:
        wd.state = Mark(phase, detail, _clock(), factor, False, reads)


def touch() -> None:
    """Progress within the current phase (from the thread that set it)."""
    wd = _current
    if wd is not None:
        wd.state = wd.state._replace(since=_clock())


def progress() -> None:
    """Progress of a background reader: counts while the rank waits for data (phases with reads)."""
    wd = _current
    if wd is not None:
        wd.bg = _clock()


@contextmanager
def phase(name: str, detail: str = "", factor: float = 1.0, reads: bool = False) -> Iterator[None]:
    """`name` for the block, then the phase before it again (leaving the block is progress)."""
    wd = _current
    if wd is None:
        yield
        return
    before = wd.state
    wd.state = Mark(name, detail, _clock(), factor, False, reads)
    try:
        yield
    finally:
        wd.state = before._replace(since=_clock())


@contextmanager
def waiting(what: str) -> Iterator[None]:
    """The block waits for the other ranks in a collective (`what`)."""
    wd = _current
    if wd is None:
        yield
        return
    before = wd.state
    wd.state = Mark("sync", what, _clock(), 1.0, True, False)
    try:
        yield
    finally:
        wd.state = before._replace(since=_clock())


def wait_mark(what: str) -> None:
    """From here on the rank waits for the others (`what`), until the next mark."""
    wd = _current
    if wd is not None:
        wd.state = Mark("sync", what, _clock(), 1.0, True, False)


def current() -> Optional["Watchdog"]:
    return _current


def observe_step_time(seconds: float) -> None:
    """A record's mean step time, the same on every rank: the derived watchdog_s follows it."""
    wd = _current
    if wd is not None and wd.derived:
        wd.seconds = max(wd.seconds, STEP_FACTOR * seconds)


def watch_compilation() -> None:
    """torch.compile was just called: watch its compilations from the first (dynamo is imported now)."""
    wd = _current
    if wd is not None:
        wd._hook_compile()


def start(world, seconds: Optional[float] = None) -> Optional["Watchdog"]:
    """Start this rank's watchdog (a collective: every rank of `world`); None when `seconds` is 0."""
    if seconds == 0:
        return None
    wd = Watchdog(world, seconds)
    wd.start()
    return wd


# ------------------------------------------------------------------ the watchdog
class Watchdog:
    """One rank's watchdog over `world`; see the module's documentation. `start()` is collective."""

    def __init__(self, world, seconds: Optional[float]):
        self.world = world
        self.derived = seconds is None
        self.seconds = float(seconds) if seconds else FLOOR_S
        # set-up: label scans and the like read the data: each piece read is progress
        self.state = Mark("set-up", "set-up (data checks, model, resume)", _clock(), LONG, False, True)
        self.bg = 0.0
        self.comm: Any = None
        self.hosts = [world.host]
        self.before: Optional[Watchdog] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._asked = 0
        self._next_ask = 0.0
        self._sent: list = []
        self._compiling: list[Mark] = []
        self._hooked = False
        self._fired = False

    @property
    def limit_text(self) -> str:
        return f"watchdog_s {self.seconds:g}" + (" (derived from the step time)" if self.derived else "")

    def start(self) -> None:
        global _current
        w = self.world
        if w.size > 1:
            self.comm = w.comm.Dup()  # questions and answers never meet the job's own messages
            self.hosts = self.comm.allgather(w.host)
        self.before, _current = _current, self
        self._hook_compile()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mpidl-watchdog")
        self._thread.start()
        atexit.register(self.stop)  # before mpi4py's own exit handler finalizes MPI
        from mpidl.world import before_finalize

        before_finalize(self.stop)

    def stop(self) -> None:
        """Stop watching (every rank at the run's end; idempotent)."""
        global _current
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._unhook_compile()
        if _current is self:
            _current = self.before
        atexit.unregister(self.stop)

    # -------------------------------------------------------------- torch.compile
    def _hook_compile(self) -> None:
        """Each compilation is a phase of its own (LONG): dynamo says when one starts and ends."""
        if self._hooked or "torch._dynamo.callback" not in sys.modules:
            return
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._compile_start)
        callback_handler.register_end_callback(self._compile_end)
        self._hooked = True

    def _unhook_compile(self) -> None:
        if self._hooked:
            from torch._dynamo.callback import callback_handler

            for register, fn in ((callback_handler.remove_start_callback, self._compile_start),
                                 (callback_handler.remove_end_callback, self._compile_end)):
                try:
                    register(fn)
                except ValueError:
                    pass
            self._hooked = False

    def _compile_start(self, args=None) -> None:
        self._compiling.append(self.state)
        self.state = Mark("compile", "torch.compile compiling", _clock(), LONG, False, False)

    def _compile_end(self, args=None) -> None:
        before = self._compiling.pop() if self._compiling else self.state
        self.state = before._replace(since=_clock())

    # -------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            while not self._stop.wait(TICK_S):
                self._hook_compile()
                self._serve()
                self._check()
        except Exception as e:  # the watchdog's own trouble must never end a healthy job
            sys.stderr.write(f"[rank {self.world.rank}] warning: the watchdog stopped: {type(e).__name__}: {e}\n")

    def _age(self, m: Mark, now: float) -> float:
        return now - (max(m.since, self.bg) if m.reads else m.since)

    def _limit(self, m: Mark) -> float:
        limit = self.seconds * m.factor
        return max(limit, COMPILE_S) if m.phase == "compile" else limit

    def _mine(self) -> dict:
        m, now = self.state, _clock()
        age, limit = self._age(m, now), self._limit(m)
        return {"rank": self.world.rank, "phase": m.phase, "detail": m.detail, "age": age, "limit": limit,
                "waiting": m.waiting, "stack": stack_text() if age > limit and not m.waiting else None}

    def _serve(self) -> None:
        """Answer the other ranks' questions: what this rank does, and since when."""
        if self.comm is None:
            return
        from mpi4py import MPI

        st = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_QUERY, status=st):
            src = st.Get_source()
            qid = self.comm.recv(source=src, tag=_QUERY)
            self._sent.append(self.comm.isend({**self._mine(), "id": qid}, dest=src, tag=_ANSWER))
        self._sent = [r for r in self._sent if not r.Test()]

    def _ask(self) -> dict[int, Optional[dict]]:
        """Every other rank's mark; None for a rank that did not answer within ANSWER_S."""
        from mpi4py import MPI

        self._asked += 1
        qid, me = self._asked, self.world.rank
        answers: dict[int, Optional[dict]] = {r: None for r in range(self.world.size) if r != me}
        for r in answers:
            self._sent.append(self.comm.isend(qid, dest=r, tag=_QUERY))
        deadline, st = _clock() + ANSWER_S, MPI.Status()
        while _clock() < deadline and any(a is None for a in answers.values()):
            self._serve()  # two ranks asking each other at once both get their answers
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_ANSWER, status=st):
                a = self.comm.recv(source=st.Get_source(), tag=_ANSWER)
                if a.get("id") == qid:
                    answers[a["rank"]] = a
            time.sleep(0.02)
        return answers

    def _check(self) -> None:
        m, now, bg = self.state, _clock(), self.bg
        age, limit = self._age(m, now), self._limit(m)
        if age <= limit:
            return
        if self.comm is None:
            self._fire({})
        elif not m.waiting:
            answers = self._ask()
            if (self.state, self.bg) == (m, bg):  # no progress while asking (else the rank moved on: no hang)
                self._fire(answers)
        elif now >= self._next_ask:
            answers = self._ask()
            self._next_ask = _clock() + max(2.0, self.seconds / 4)
            if (self.state, self.bg) != (m, bg):
                # The wait ended while we asked: a rank that has finished since (its watchdog
                # stopped, so it did not answer) is no sign of a hang.
                return
            silent = [r for r, a in answers.items() if a is None]
            stuck = [r for r, a in answers.items() if a and not a["waiting"] and a["age"] > a["limit"]]
            busy = [r for r, a in answers.items() if a and not a["waiting"] and a["age"] <= a["limit"]]
            if silent or (stuck and age > limit + GRACE_S):
                self._fire(answers)
            elif not stuck and not busy and all(a is not None and a["age"] > a["limit"] for a in answers.values()):
                # every rank waits, for collectives that will never match: the lowest rank says so
                # (the others too, should it not have ended the job by then)
                if self.world.rank == min(answers.keys() | {self.world.rank}) or age > limit + 2 * GRACE_S:
                    self._fire(answers)

    # -------------------------------------------------------------- the end
    def _fire(self, answers: dict[int, Optional[dict]]) -> None:
        if self._fired:
            return
        self._fired = True
        mine = self._mine()
        if mine["stack"] is None and not mine["waiting"]:
            mine["stack"] = stack_text()
        line, stacks = report(self.world.rank, mine, answers, self.hosts, self.limit_text)
        out = [f"[rank {self.world.rank}] error: {line}\n"]
        for rank, text in stacks:
            out += [f"[rank {rank}] {ln}\n" for ln in text.rstrip("\n").splitlines()]
        sys.stderr.write("".join(out))
        sys.stderr.flush()
        self.world.abort(EXIT_STUCK)


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "ranks 0-2, 5"; [3] -> "rank 3"."""
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ("ranks " if len(ranks) > 1 else "rank ") + ", ".join(parts)


def _hosts(ranks: list[int], hosts: list[str]) -> str:
    return ", ".join(dict.fromkeys(hosts[r] if r < len(hosts) else "?" for r in ranks))


def report(me: int, mine: dict, answers: dict[int, Optional[dict]], hosts: list[str],
           limit_text: str) -> tuple[str, list[tuple[int, str]]]:
    """The one line that ends the job, and the stacks (rank, text) to print after it (pure)."""
    marks = {me: mine, **answers}
    silent = sorted(r for r, a in marks.items() if a is None)
    stuck = sorted(r for r, a in marks.items() if a and not a["waiting"] and a["age"] > a["limit"])
    rest = sorted(r for r in marks if r not in silent and r not in stuck)
    parts = []
    for r in stuck:
        a = marks[r]
        assert a is not None
        parts.append(f"rank {r} on {_hosts([r], hosts)} made no progress for {a['age']:.0f} s, in "
                     f"{a['detail'] or a['phase']}")
    if silent:
        parts.append(f"{_ranks(silent)} on {_hosts(silent, hosts)} did not answer within {ANSWER_S:g} s "
                     "(frozen, or cut off: a node lost?)")
    if not stuck and not silent:
        every = [f"rank {r} on {_hosts([r], hosts)} in {_doing(marks[r])}" for r in rest]
        parts.append("every rank waits in a collective that the others never join: " + "; ".join(every))
        rest = []
    groups: dict[tuple[bool, str], list[int]] = {}
    for r in rest:
        a = marks[r]
        assert a is not None
        groups.setdefault((a["waiting"], a["detail"] or a["phase"]), []).append(r)
    for (waits, what), ranks in groups.items():
        verb = ("wait" if len(ranks) > 1 else "waits") if waits else ("are" if len(ranks) > 1 else "is")
        parts.append(f"{_ranks(ranks)} on {_hosts(ranks, hosts)} {verb} in {what}")
    line = f"watchdog: {'; '.join(parts)} ({limit_text}); ending the job (exit {EXIT_STUCK})"
    stacks = [(r, a["stack"]) for r in stuck if (a := marks[r]) and a.get("stack")]
    return line, stacks


def _doing(answer: Optional[dict]) -> str:
    assert answer is not None  # a rank that answered
    return answer["detail"] or answer["phase"]


def stack_text() -> str:
    """This process's Python stacks as faulthandler writes them, the main thread marked, the
    watchdog's own thread left out."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        text = f.read()
    main = f"0x{threading.main_thread().ident:016x}"
    blocks, out = text.split("\n\n"), list[str]()
    for block in blocks:
        if block.startswith("Current thread"):
            continue  # this thread: the watchdog itself
        if block.startswith(f"Thread {main}"):
            block = block.replace(f"Thread {main}", f"Thread {main} (main)", 1)
            out.insert(0, block)
        else:
            out.append(block)
    return "\n".join(b.rstrip("\n") for b in out if b.strip()) + "\n"


