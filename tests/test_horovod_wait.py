"""How the Horovod backend's training thread waits for its allreduces (mpidl/train/backends/horovod.py):
promptly on a short wait, and without taking a late peer's core on a long one. A fake clock drives
it: the test checks the polls' schedule, not the time anything takes."""
from __future__ import annotations

import pytest

from conftest import needs_horovod


@needs_horovod
@pytest.mark.parametrize("done_after", [0.0005, 0.05, 3.0])
def test_polls_promptly_then_back_off_on_a_long_wait(monkeypatch, done_after):
    from mpidl.train.backends import horovod as backend

    clock = [0.0]
    sleeps: list[tuple[float, float]] = []  # (time waited so far, sleep)

    def sleep(s):
        sleeps.append((clock[0], s))
        clock[0] += s

    monkeypatch.setattr(backend.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(backend.time, "sleep", sleep)
    monkeypatch.setattr(backend.hvd, "poll", lambda handle: clock[0] >= done_after)
    monkeypatch.delenv(backend.WAIT_ENV, raising=False)
    backend.wait([7])
    assert clock[0] >= done_after
    # never more than ~0.2 ms late on a short wait, nor more than 1 % of the wait so far on a long one
    for waited, s in sleeps:
        assert s <= max(200e-6, 0.01 * waited) + 1e-12 and s <= 5e-3, (waited, s)
    late = clock[0] - done_after
    assert late <= max(200e-6, 0.01 * done_after) + 1e-12, late
    if done_after >= 3.0:
        # a peer 3 s late: about a thousand polls at most, not the fifteen thousand of a 0.2 ms period
        assert len(sleeps) < 1500, len(sleeps)
