"""The sbatch scripts mpidl writes: pinned examples, and quoting that survives hostile values.

Golden files: slurm/*.sbatch are the committed examples. After an intended change, write
them again with `.venv/bin/python -m mpidl.slurm.examples` and review the diff.

Quoting: hypothesis generates values with spaces, quotes, `$()`, backticks, `;` and newlines
for every user value that lands in a script; the script must pass `bash -n`, and when bash
runs it the launcher must receive exactly those values and nothing must have run. The
launcher here is a stand-in `srun` that records its arguments (the real one is exercised by
test_slurm_submit.py); SLURM's own reading of #SBATCH lines is checked against a real sbatch.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra (make setup installs it)")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run
from mpidl.errors import BadInput
from mpidl.slurm import examples, submit
from mpidl.slurm.script import Plan, shown_path, standalone
from mpidl.spec import load_spec, quoted
from test_spec import BASE


def test_committed_examples_match_what_mpidl_writes():
    for name, text in examples.render(ROOT).items():
        committed = (ROOT / name).read_text()
        assert committed == text, f"{name} differs from what mpidl writes: python -m mpidl.slurm.examples"


def test_examples_are_valid_bash_and_pass_sbatch_parsing():
    for name in examples.EXAMPLES:
        r = subprocess.run(["bash", "-n", str(ROOT / name)], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
    text = (ROOT / "slurm" / "resnet50-2x4gpu.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@90", "#SBATCH --requeue",
                 'srun --mpi=pmix "$MPIDL" train jobs/gpu-resnet50.yaml --requeue'):
        assert line in text.splitlines(), line
    assert str(ROOT) not in text and "/root" not in text  # no machine paths in committed scripts


@pytest.mark.parametrize("launcher,launch", [
    ("srun", 'srun --mpi=pmix --ntasks-per-node=2 "$MPIDL" train job.yaml --requeue'),
    ("mpirun", 'launch mpirun --bind-to none -npernode 2 "$MPIDL" train job.yaml --requeue')])
def test_a_node_range_asks_for_cpus_per_node_and_places_ranks_on_the_launch_line(tmp_path, launcher, launch):
    """A task count in the allocation would be fixed when the job first starts, and the job requeued
    after losing a node would wait for that node: the allocation asks for each node's CPUs instead
    (--mincpus), and the launch line places the ranks."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**BASE, "slurm": {"nodes": "1-2", "tasks_per_node": 2, "cpus_per_task": 3,
                                                     "launcher": launcher}}))
    lines = standalone(Plan(load_spec(job), "job.yaml")).splitlines()
    assert "#SBATCH --nodes=1-2" in lines and "#SBATCH --mincpus=6" in lines and "#SBATCH --cpus-per-task=3" in lines
    assert not any("ntasks" in ln for ln in lines if ln.startswith("#SBATCH"))
    assert launch in lines
    prepared = submit.prepare(str(job), [], array=[], standalone_script=False, cwd=tmp_path, ask_controller=False)
    text = prepared.text.splitlines()
    assert "#SBATCH --nodes=1-2" in text and "#SBATCH --mincpus=6" in text
    assert not any("ntasks" in ln for ln in text if ln.startswith("#SBATCH"))
    if launcher == "srun":
        assert any(ln.startswith("srun ") and " --mpi=pmix --ntasks-per-node=2 " in ln for ln in text), text
    else:
        assert any(ln.startswith("launch mpirun --bind-to none -npernode 2 ") for ln in text), text


# Pieces of hostile text; hypothesis strings them together with arbitrary characters.
FRAGMENTS = ["$(touch PWNED)", "`touch PWNED`", "; touch PWNED", "&& touch PWNED", "'", '"', "\\", "\n",
             " ", "\t", "$HOME", "${X:-y}", "*", "?", "~", "#", "!", "|", ">PWNED", "--set", "=", "é"]
hostile = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(st.characters(
    blacklist_categories=("Cs",), blacklist_characters="\x00/"), max_size=4)), min_size=1, max_size=6).map("".join)


def _fake_launchers(bin_dir: Path) -> None:
    """`srun` and `mpirun` stand-ins: record argv and the environment variable MPIDL_PROBE."""
    bin_dir.mkdir()
    code = ("#!{py}\nimport json, os, sys\n"
            "json.dump({{'argv': sys.argv[1:], 'probe': os.environ.get('MPIDL_PROBE')}},"
            " open(os.environ['CAPTURE'], 'w'))\n").format(py=os.sys.executable)
    for name in ("srun", "mpirun"):
        (bin_dir / name).write_text(code)
        (bin_dir / name).chmod(0o755)


def _run_script(text: str, work: Path) -> dict:
    script = work / "job.sbatch"
    script.write_text(text)
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    env = {"PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}", "CAPTURE": str(work / "capture.json"),
           "HOME": str(work)}
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=work, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any(p.name.startswith("PWNED") for p in work.rglob("*")), "a value ran as shell"
    return json.loads((work / "capture.json").read_text())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=st.lists(hostile, min_size=1, max_size=3), env_value=hostile, folder=hostile,
       launcher=st.sampled_from(["srun", "mpirun"]))
def test_hostile_values_arrive_unchanged_in_a_standalone_script(tmp_path_factory, sets, env_value, folder, launcher):
    work = tmp_path_factory.mktemp("q")
    _fake_launchers(work / "bin")
    venv = work / ("v" + folder) / "venv"  # a directory name holds anything but '/' and NUL
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "mpidl").write_text("#!/bin/sh\n")
    (venv / "bin" / "mpidl").chmod(stat.S_IRWXU)
    job = work / ("j" + folder + ".yaml")
    job.write_text(yaml.safe_dump({**BASE, "slurm": {"env": {"MPIDL_PROBE": env_value}, "launcher": launcher}}))
    # the --set values as given on the command line (the script quotes text; the spec validates it)
    plan = Plan(load_spec(job), shown_path(job, work), tuple(sets), shown_path(venv, work))
    got = _run_script(standalone(plan), work)
    head = ["--mpi=pmix"] if launcher == "srun" else ["--bind-to", "none"]
    expect_sets = [x for v in sets for x in ("--set", v)]
    assert got["argv"] == [*head, str(Path(plan.venv) / "bin" / "mpidl"), "train", job.name, "--requeue", *expect_sets]
    assert got["probe"] == env_value


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(output=hostile.filter(lambda v: "\\" not in v and "%" not in v
                            and all(ord(c) >= 32 and c != "\x7f" for c in v)),
       env_value=hostile)
def test_hostile_values_arrive_unchanged_in_a_submitit_script(tmp_path_factory, output, env_value):
    work = tmp_path_factory.mktemp("q")
    _fake_launchers(work / "bin")
    venv = Path(os.sys.prefix)
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump({**BASE, "slurm": {"env": {"MPIDL_PROBE": env_value}}}))
    out_dir = work / ("o" + output.replace("{", "(").replace("}", ")"))  # `output` is a format string
    prepared = submit.prepare(str(job), ["output=" + quoted(str(out_dir))], array=[], standalone_script=False,
                              cwd=work, venv=str(venv), ask_controller=False)
    got = _run_script(prepared.text, work)
    folder = str(out_dir / "slurm")
    assert got["argv"][-6:] == ["--mpi=pmix", str(venv.absolute() / "bin" / "python"), "-u", "-m",
                                "submitit.core._submit", folder]
    assert got["probe"] == env_value


def test_values_an_sbatch_line_cannot_carry_are_refused(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(BASE))
    with pytest.raises(BadInput, match="name .*cannot pass through an #SBATCH line"):
        submit.prepare(str(job), ["slurm.job_name=a\\b"], array=[], standalone_script=True, cwd=tmp_path)
    with pytest.raises(BadInput, match="name = .*a name is one folder name"):  # a folder name is checked first
        submit.prepare(str(job), ["name=a\\b"], array=[], standalone_script=True, cwd=tmp_path)
    with pytest.raises(BadInput, match="output .*cannot pass through an #SBATCH line"):
        submit.prepare(str(job), ['output="runs/a\\nb"'], array=[], standalone_script=False, cwd=tmp_path)


def test_percent_in_the_run_folder_is_refused_where_slurm_names_its_logs(tmp_path, monkeypatch):
    """SLURM expands % in #SBATCH --output, which names the run folder (submitit): the spec refuses
    % in output, and submit the folder the relative output lies in."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(BASE))
    cwd = tmp_path / "a%jb"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a relative output lies in the folder mpidl runs in
    with pytest.raises(BadInput, match=r'^output \(the run folder, where the logs go\) = ".*/a%jb/runs/s": % is refused'):
        submit.prepare(str(job), [], array=[], standalone_script=False, cwd=cwd, ask_controller=False)
    with pytest.raises(BadInput, match=r'output = "runs/%j": % is refused'):
        submit.prepare(str(job), ["output=runs/%j"], array=[], standalone_script=False, cwd=tmp_path,
                       ask_controller=False)
    # a standalone script's log is slurm-<job>.out in the submit folder: the run folder is not in it
    assert submit.prepare(str(job), [], array=[], standalone_script=True, cwd=cwd, ask_controller=False).text


def test_a_file_where_the_run_folder_would_be_is_refused_before_submitting(tmp_path):
    """submitit makes its folder of logs in the run folder: a file there failed with a traceback."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**BASE, "output": str(tmp_path / "run")}))
    (tmp_path / "run").write_text("x")
    for standalone_script in (False, True):
        with pytest.raises(BadInput, match=f'^output = "{tmp_path}/run": {tmp_path}/run is a file, not a folder$'):
            submit.prepare(str(job), [], array=[], standalone_script=standalone_script, cwd=tmp_path,
                           ask_controller=False)


def _sbatch_sees(script_text: str, tmp_path: Path, env: dict) -> dict:
    """Submit held, read back what SLURM parsed from the #SBATCH lines, cancel."""
    script = tmp_path / "held.sbatch"
    script.write_text(script_text.replace("#!/bin/bash\n", "#!/bin/bash\n#SBATCH --hold\n", 1))
    r = run(["sbatch", "--parsable", str(script)], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.output
    job_id = r.stdout.strip()
    try:
        shown = run(["scontrol", "show", "job", job_id], env=env).stdout
    finally:
        run(["scancel", job_id], env=env)
    name = shown.split("JobName=", 1)[1].split("\n", 1)[0]
    comment = shown.split("Comment=", 1)[1].split("\n", 1)[0][:-1]  # scontrol pads it with a space
    return {"name": name, "comment": comment}


one_line = hostile.filter(lambda v: "\\" not in v and all(ord(c) >= 32 and c != "\x7f" for c in v))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=one_line, comment=one_line, standalone=st.booleans())
def test_sbatch_reads_hostile_sbatch_values_unchanged(slurm_cluster, tmp_path_factory, name, comment, standalone):
    work = tmp_path_factory.mktemp("sb")
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump({**BASE, "output": str(work / "run"),
                                   "slurm": {"job_name": name, "sbatch": {"comment": comment}}}))
    prepared = submit.prepare(str(job), [], array=[], standalone_script=standalone, cwd=work)
    assert _sbatch_sees(prepared.text, work, slurm_cluster) == {"name": name, "comment": comment}
