"""The job spec's slurm: section: strict like the rest, one-line errors naming key and value."""
from __future__ import annotations

import pytest

from conftest import ROOT
from mpidl.spec import load_spec, slurm_time_seconds
from test_spec import BASE, error, spec_file


@pytest.mark.parametrize("text,seconds", [
    ("30", 1800), ("25:30", 1530), ("90:00", 5400), ("1:00:00", 3600), ("0:15:00", 900),
    ("2-0", 172800), ("2-3:04", 183840), ("1-2:03:04", 93784),
])
def test_slurm_time_formats(text, seconds):
    assert slurm_time_seconds(text) == seconds


@pytest.mark.parametrize("value,reason", [
    ("25:99", "seconds must be below 60"), ("1:60:00", "minutes must be below 60"),
    ("1-24", "hours after a day count must be below 24"), ("0", "a time limit must be positive"),
    ("1h", "not a SLURM time limit"), ("1:2:3:4", "not a SLURM time limit"), ("-5", "not a SLURM time limit"),
])
def test_bad_time_limit_names_key_and_value(tmp_path, value, reason):
    msg = error(spec_file(tmp_path), [f"slurm.time={value}"])
    shown = value if value.lstrip("-").isdigit() else f'"{value}"'  # YAML reads bare numbers as numbers
    assert f"slurm.time = {shown}: {reason}" in msg, msg


def test_yaml_reads_times_as_text(tmp_path):
    # PyYAML's safe_load reads 1:30:00 as the base-60 integer 5400; the spec keeps SLURM's text.
    p = tmp_path / "job.yaml"
    p.write_text("name: s\nepochs: 1\ndata: {files: d.h5, batch: 8}\nmodel: {name: mlp}\n"
                 "optimizer: {lr: 0.1}\nslurm: {time: 1:30:00}\n")
    assert load_spec(p).slurm.time == "1:30:00"
    assert load_spec(p, ["slurm.time=45"]).slurm.time_seconds == 45 * 60  # a bare number is minutes


def test_a_node_range(tmp_path):
    """`nodes: 2-4`: as many nodes as are free, and fewer after a lost node; 2-2 is just 2."""
    s = load_spec(spec_file(tmp_path), ["slurm.nodes=2-4", "slurm.tasks_per_node=2"]).slurm
    assert (s.nodes, s.min_nodes, s.max_nodes, s.node_range, s.ranks) == ("2-4", 2, 4, True, 8)
    s = load_spec(spec_file(tmp_path), ["slurm.nodes=2-2"]).slurm
    assert (s.nodes, s.node_range) == (2, False)
    for given in ("3", 3):
        assert load_spec(spec_file(tmp_path), [f"slurm.nodes={given}"]).slurm.nodes == 3


def test_defaults_fit_gpus(tmp_path):
    s = load_spec(spec_file(tmp_path)).slurm
    assert (s.nodes, s.ranks_per_node, s.gpus_per_node, s.launcher, s.signal, s.signal_lead_s, s.requeue_limit) == \
        (1, 1, 0, "srun", "USR2", 90, 3)
    s = load_spec(spec_file(tmp_path), ["slurm.gpus_per_node=4", "slurm.cpus_per_node=64", "slurm.nodes=2"]).slurm
    assert (s.ranks_per_node, s.ranks, s.cpus_for_each_task()) == (4, 8, 16)  # one rank per GPU, CPUs split
    s = load_spec(spec_file(tmp_path), ["slurm.gpus_per_node=2", "slurm.tasks_per_node=4", "slurm.cpus_per_task=3"])
    assert (s.slurm.ranks_per_node, s.slurm.cpus_for_each_task()) == (4, 3)


def test_set_reaches_the_slurm_section(tmp_path):
    s = load_spec(spec_file(tmp_path), ["slurm.nodes=4", "slurm.partition=gpu", "slurm.env={NCCL_DEBUG: INFO}",
                                        "slurm.setup=[module load cuda]", "slurm.launcher=mpirun"]).slurm
    assert (s.nodes, s.partition, s.env, s.setup, s.launcher) == (4, "gpu", {"NCCL_DEBUG": "INFO"},
                                                                 ["module load cuda"], "mpirun")


@pytest.mark.parametrize("overrides,expect", [
    (["slurm.nodes=0"], "slurm.nodes = 0: at least 1 node"),
    (["slurm.nodes=3-2"], 'slurm.nodes = "3-2": a range min-max with min <= max, not 3-2'),
    (["slurm.nodes=two"], 'slurm.nodes = "two": a node count, or a range min-max (2-4)'),
    (["slurm.nodes=0-2"], 'slurm.nodes = "0-2": at least 1 node'),
    (["slurm.sbatch={mincpus: 4}"], "'mincpus' is set from the section's own keys"),
    (["slurm.gpus_per_node=4", "slurm.tasks_per_node=2"],
     "slurm.gpus_per_node = 4: more GPUs than the 2 rank(s) per node (tasks_per_node) can use"),
    (["slurm.gpus_per_node=4", "slurm.tasks_per_node=6"], "slurm.gpus_per_node = 4: tasks_per_node = 6 ranks"),
    (["slurm.tasks_per_node=4", "slurm.cpus_per_task=2", "slurm.cpus_per_node=6"],
     "slurm.cpus_per_node = 6: fewer than tasks_per_node × cpus_per_task = 4 × 2"),
    (["slurm.mem=12GB"], 'slurm.mem = "12GB": SLURM memory is a number'),
    (["slurm.signal=USR1"], 'slurm.signal = "USR1": Input should be'),
    (["slurm.launcher=torchrun"], 'slurm.launcher = "torchrun"'),
    (["slurm.signal_lead_s=0"], "slurm.signal_lead_s = 0"),
    (["slurm.requeue_limit=-1"], "slurm.requeue_limit = -1"),
    (["slurm.partitoin=gpu"], "unknown key 'slurm.partitoin'"),
    (["slurm.sbatch={nodes: 3}"], "'nodes' is set from the section's own keys"),
    (["slurm.sbatch={Mail_Type: END}"], "'Mail_Type' is not an sbatch long option name"),
    (["slurm.env={1X: a}"], "'1X' is not an environment variable name"),
    (["slurm.sbatch={part: debug}"], "'part' abbreviates --partition (sbatch reads a unique prefix"),
    (["slurm.sbatch={outp: x.log}"], "'outp' abbreviates --output"),
    (["slurm.sbatch={sig: USR1@5}"], "'sig' abbreviates --signal"),
    (["slurm.sbatch={no-requeu: true}"], "'no-requeu' abbreviates --no-requeue"),
    (["slurm.sbatch={ntasks-per: 2}"], "'ntasks-per' abbreviates --ntasks-per-node"),
    (["slurm.sbatch={exclu: true}"], "'exclu' abbreviates --exclusive"),
    (["slurm.sbatch={gpus: 8}"], "'gpus' is set from the section's own keys"),
    (["slurm.time=1", "slurm.signal_lead_s=60"],
     "slurm.signal_lead_s = 60: not below the time limit slurm.time = 1 (60 s): SLURM would send the warning"),
    (["slurm.time=0:01:30", "slurm.signal_lead_s=120"], "slurm.signal_lead_s = 120: not below the time limit"),
    (["slurm.job_name=a\\b"], "slurm.job_name = \"a\\\\b\": newlines, control characters and backslashes"),
])
def test_bad_slurm_values(tmp_path, overrides, expect):
    msg = error(spec_file(tmp_path), overrides)
    assert expect in msg, msg


def test_sbatch_options_that_are_no_abbreviation_of_an_owned_one_pass(tmp_path):
    extra = "{mail-type: END, comment: x, exclude: n1, gres-flags: enforce-binding, mem-per-cpu: 2G, gpus-per-task: 1}"
    assert "exclude" in load_spec(spec_file(tmp_path), [f"slurm.sbatch={extra}"]).slurm.sbatch
    s = load_spec(spec_file(tmp_path), ["slurm.time=2", "slurm.signal_lead_s=60"]).slurm  # 60 s of warning in 120
    assert s.signal_lead_s < s.time_seconds


def test_newline_in_an_sbatch_value_is_refused(tmp_path):
    tree = {**BASE, "slurm": {"partition": "gpu\n#SBATCH --exclusive"}}
    assert "slurm.partition" in error(spec_file(tmp_path, tree)) and "newlines" in error(spec_file(tmp_path, tree))


def test_slurm_section_is_not_part_of_the_fingerprint(tmp_path):
    # resources may change across a requeue or a resubmission; the checkpoint still fits
    a = load_spec(spec_file(tmp_path))
    b = load_spec(spec_file(tmp_path), ["slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.time=2-0",
                                        "slurm.partition=big", "slurm.requeue_limit=9"])
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != load_spec(spec_file(tmp_path), ["optimizer.lr=0.2"]).fingerprint()


@pytest.mark.parametrize("job", ["demo.yaml", "gpu-resnet50.yaml"])
def test_shipped_jobs_have_slurm_sections(job):
    s = load_spec(ROOT / "jobs" / job).slurm
    assert s.ranks >= 2 and s.time_seconds >= 10 * 60
