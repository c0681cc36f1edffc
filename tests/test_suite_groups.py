"""The suite's own worker groups (tests/conftest.py): under `make test`'s pytest-xdist workers,
the tests that share a costly fixture run on one worker, so it is made once."""
from __future__ import annotations

from conftest import own_module_fixtures


def _group(item):
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark else None


def test_tests_sharing_a_module_fixture_of_their_file_share_a_worker(request):
    items = request.session.items
    sharing = [i for i in items if own_module_fixtures(i) and i.get_closest_marker("slurm") is None]
    for item in sharing:
        assert _group(item) == item.module.__name__, (item.nodeid, own_module_fixtures(item), _group(item))
    study = [i for i in items if "tiny_study" in i.fixturenames]
    assert all(_group(i) == "test_scaling" for i in study)  # the study runs once: 85 CPU-s here
    plain = [i for i in items if i.nodeid.endswith("test_weak_efficiency_on_known_timings")]
    assert all(_group(i) is None for i in plain)  # a test of its own is free to run on any worker
