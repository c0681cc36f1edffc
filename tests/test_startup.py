"""A process's start and exit without the collector rescanning torch (mpidl/startup.py).

What it saves is measured by benchmarks/bench_startup.py; these check that it does what it says,
only in a process mpidl owns, and leaves the collector as it found it otherwise: each case in a
fresh interpreter, since a freeze lasts as long as its process."""
from __future__ import annotations

import configparser
import json
import subprocess
import sys

from mpidl import cli, startup
from tests.conftest import ROOT, clean_env

# Prints, after every other exit handler, what the process left: its freeze, its collector, its modules.
AT_EXIT = """
import atexit, gc, json, sys
atexit.register(lambda: print("RESULT " + json.dumps({"frozen": gc.get_freeze_count(), "gc_on": gc.isenabled(),
                                                     "loaded": "heavy" in sys.modules})))
"""


def at_exit(code: str, tmp_path, **env: str) -> dict:
    (tmp_path / "heavy.py").write_text("made = [[] for _ in range(100_000)]\n")  # 100 collections' worth
    p = subprocess.run([sys.executable, "-c", AT_EXIT + f"sys.path.insert(0, {str(tmp_path)!r})\n" + code],
                       capture_output=True, text=True, timeout=120, env=clean_env(env), cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_load_in_a_claimed_process_imports_with_the_collector_off_then_freezes(tmp_path):
    code = """
import gc
from mpidl import startup
startup.claim()
collected = []
gc.callbacks.append(lambda phase, info: phase == "start" and collected.append(info["generation"]))
startup.load("heavy")
assert not collected, collected  # no collection while it loaded
assert gc.isenabled() and gc.get_freeze_count() > 100_000
"""
    left = at_exit(code, tmp_path)
    assert left["gc_on"] and left["loaded"] and left["frozen"] > 100_000
    disabled = at_exit("import gc; gc.disable()\nfrom mpidl import startup\nstartup.claim()\nstartup.load('heavy')",
                       tmp_path)
    assert disabled["gc_on"] is False and disabled["loaded"]  # a collector turned off stays off


def test_a_process_not_claimed_keeps_its_collector(tmp_path):
    # a caller's process (a notebook, a test run calling mpidl.cli.main): load() imports nothing early
    assert at_exit("from mpidl import startup\nstartup.load('heavy')", tmp_path) == \
        {"frozen": 0, "gc_on": True, "loaded": False}


def test_a_claimed_process_freezes_at_exit_once_and_never_when_turned_off(tmp_path):
    claim = "import gc\nfrom mpidl import startup\nassert gc.get_freeze_count() == 0\nstartup.claim()\nstartup.claim()\n"
    assert at_exit(claim, tmp_path)["frozen"] > 0
    off = at_exit(claim + "startup.load('heavy')", tmp_path, **{startup.ENV: "0"})
    assert off == {"frozen": 0, "gc_on": True, "loaded": False}  # Python's default: nothing loaded early either


def test_the_mpidl_command_claims_its_process(tmp_path):
    # `python -m mpidl.cli` (the console script calls the same entry()) on a command without torch
    run_cli = "import runpy\nsys.argv = ['mpidl', 'net', '--json']\nrunpy.run_module('mpidl.cli', run_name='__main__')"
    code = "try:\n    " + run_cli.replace("\n", "\n    ") + "\nexcept SystemExit as e:\n    assert not e.code\n"
    assert at_exit(code, tmp_path)["frozen"] > 0
    assert at_exit(code, tmp_path, **{startup.ENV: "0"})["frozen"] == 0
    scripts = configparser.ConfigParser()
    scripts.read(ROOT / "setup.cfg")
    assert "mpidl = mpidl.cli:entry" in scripts["options.entry_points"]["console_scripts"]


def test_a_job_loads_torch_after_arming_and_reading_its_spec(monkeypatch):
    from mpidl import preemption
    from mpidl.spec import load_spec
    from mpidl.train import trainer

    order: list = []
    monkeypatch.setattr(preemption, "arm", lambda: order.append("arm"))
    monkeypatch.setattr("mpidl.spec.load_spec", lambda *a, **k: order.append("spec") or load_spec(*a, **k))
    monkeypatch.setattr(startup, "load", lambda *modules: order.append(modules))
    monkeypatch.setattr(trainer, "train", lambda spec, **kw: order.append("train") or {})
    assert cli.main(["train", str(ROOT / "jobs" / "demo.yaml")]) == 0
    # a warning signal while torch loads is recorded, not fatal; a typo fails before torch loads
    assert order == ["arm", "spec", startup.TRAINING, "train"]
