"""Lint and types, as part of the suite: ruff over the repository's Python (pyproject.toml's
[tool.ruff] says which rules where) and mypy over mpidl/ ([tool.mypy]), both without a finding.

Each runs as its own process from the repository root, with this interpreter's copy of the tool
(`make setup` installs the versions setup.cfg's dev extras pin). Where a tool is not installed
its test skips. mypy's first run takes 20-40 s (torch's stubs); its cache (.mypy_cache) makes the
next ones a few seconds.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT


def _check(tool: str, args: list[str], timeout: float) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed for {sys.executable} (`make setup` installs it: setup.cfg's dev extras)")
    p = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{tool} {importlib.metadata.version(tool)} (setup.cfg's dev extras pin the version this code "
                    f"is clean under) found:\n{p.stdout}{p.stderr}", pytrace=False)


def test_ruff_finds_nothing():
    _check("ruff", ["check", "--output-format", "concise", "."], timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_finds_nothing():
    _check("mypy", [], timeout=540)  # the files and options: pyproject.toml's [tool.mypy]
