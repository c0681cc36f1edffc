"""The job spec: strict validation with one-line errors, --set overrides, the fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from conftest import ROOT
from mpidl.errors import BadInput
from mpidl.spec import JobSpec, check_run_folders, load_spec

BASE = {
    "name": "s", "epochs": 1,
    "data": {"files": "d.h5", "batch": 8},
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "optimizer": {"lr": 0.1},
}


def spec_file(tmp_path: Path, tree: dict | None = None) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(tree if tree is not None else BASE))
    return p


def error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(BadInput) as e:
        load_spec(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path) + ": "), msg
    return msg


@pytest.mark.parametrize("job", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_jobs_are_valid(job):
    spec = load_spec(job)
    assert spec.epochs or spec.steps
    assert spec.data.synth is not None  # every shipped job runs on its own data out of the box


def test_defaults(tmp_path):
    s = load_spec(spec_file(tmp_path))
    assert (s.backend, s.precision, s.accumulate, s.optimizer.name) == ("horovod", "fp32", 1, "sgd")
    assert s.data.keys == ["x", "y"] and s.data.shuffle == "block" and s.data.prefetch == 4
    assert s.run_dir == Path("runs/s") and s.checkpoint_dir == Path("runs/s/checkpoints")
    assert s.schedule.scale_lr is True


def test_overrides_are_read_as_yaml(tmp_path):
    s = load_spec(spec_file(tmp_path), ["optimizer.lr=0.5", "backend=mpi", "model.args.hidden=[4, 4]",
                                        "data.preprocess.flip=true", "checkpoint.dir=/x/ck", "steps=7"])
    assert s.optimizer.lr == 0.5 and s.backend == "mpi" and s.model.args["hidden"] == [4, 4]
    assert s.data.preprocess.flip is True and s.checkpoint_dir == Path("/x/ck") and s.steps == 7
    s = load_spec(spec_file(tmp_path), ["name=a=b"])  # only the first '=' splits
    assert s.name == "a=b"


@pytest.mark.parametrize("overrides,expect", [
    (["optimizer.lr=0"], "optimizer.lr = 0: Input should be greater than 0"),
    (["optimizer.momentum=1.5"], "optimizer.momentum = 1.5: Input should be less than 1"),
    (["optimizer.name=rmsprop"], 'optimizer.name = "rmsprop"'),
    (["data.batch=abc"], 'data.batch = "abc": Input should be a valid integer'),
    (["data.batch=-4"], "data.batch = -4: Input should be greater than 0"),
    (["data.val_fraction=1"], "data.val_fraction = 1: Input should be less than 1"),
    (["data.shuffle=random"], 'data.shuffle = "random"'),
    (["precision=fp16"], 'precision = "fp16"'),
    (["backend=gloo"], 'backend = "gloo"'),
    (["epochs=0"], "epochs = 0: Input should be greater than 0"),
    (["epochs=null"], "give epochs or steps"),
    (["modell.name=mlp"], "unknown key 'modell'"),
    (["data.synth.kind=video", "data.synth.rows=5"], 'data.synth.kind = "video"'),
    (["data.synth.kind=images"], "missing key 'data.synth.rows'"),
    (["horovod.compression=int8"], 'horovod.compression = "int8"'),
    (["schedule.kind=linear"], 'schedule.kind = "linear"'),
    (["target_accuracy=2"], "target_accuracy = 2: Input should be less than or equal to 1"),
    (["optimizer.lr"], "--set expects key.path=value, got 'optimizer.lr'"),
    (["optimizer..lr=1"], "empty key in path"),
    (["name.first=x"], "'name' is a value, not a section"),
])
def test_bad_values_give_one_line_naming_the_key(tmp_path, overrides, expect):
    assert expect in error(spec_file(tmp_path), overrides)


@pytest.mark.parametrize("rename,expect", [
    (("optimizer", "optimizr"), "unknown key 'optimizr' — did you mean 'optimizer'?"),
    (("data.batch", "data.bach"), "unknown key 'data.bach' — did you mean 'data.batch'?"),
    (("model.name", "model.nmae"), "unknown key 'model.nmae' — did you mean 'model.name'?"),
])
def test_a_typo_is_reported_as_itself_not_as_the_key_it_misses(tmp_path, rename, expect):
    """The misspelt key is what the user wrote: name it (with the nearest valid key) before
    the required key its absence leaves missing."""
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    *path, old = rename[0].split(".")
    node = tree
    for p in path:
        node = node[p]
    node[rename[1].split(".")[-1]] = node.pop(old)
    msg = error(spec_file(tmp_path, tree))
    assert expect in msg and "missing" not in msg, msg


@pytest.mark.parametrize("overrides,expect", [
    (["data.preprocess.flipp=true"], "unknown key 'data.preprocess.flipp' — did you mean 'data.preprocess.flip'?"),
    (["data.synth.kind=images", "data.synth.rows=9", "data.synth.clases=3"],
     "unknown key 'data.synth.clases' — did you mean 'data.synth.classes'?"),
    (["checkpoint.every_step=5"], "unknown key 'checkpoint.every_step' — did you mean 'checkpoint.every_steps'?"),
    (["zzzz=1"], "unknown key 'zzzz'"),
])
def test_unknown_keys_at_any_depth_name_the_nearest(tmp_path, overrides, expect):
    msg = error(spec_file(tmp_path), overrides)
    assert msg.endswith(expect), msg
    if "did you" not in expect:
        assert "did you mean" not in msg  # nothing close: no guess


@pytest.mark.parametrize("overrides,expect", [
    (["optimizer.lr=.inf"], "optimizer.lr = .inf: Input should be a finite number"),
    (["optimizer.weight_decay=.inf"], "optimizer.weight_decay = .inf: Input should be a finite number"),
    (["schedule.warmup_epochs=.inf"], "schedule.warmup_epochs = .inf: Input should be a finite number"),
    (["optimizer.lr=.nan"], "optimizer.lr = .nan: Input should be a finite number"),
    (["schedule.min_lr=-.inf"], "schedule.min_lr = -.inf: Input should be a finite number"),
    (["optimizer.betas=[.nan, 0.9]"], "optimizer.betas.0 = .nan: Input should be a finite number"),
    (["optimizer.clip_weights.min=-.inf", "optimizer.clip_weights.max=1"], "clip_weights.min = -.inf"),
    (["data.synth.kind=tabular", "data.synth.rows=9", "data.synth.noise=.inf"], "data.synth.noise = .inf"),
])
def test_non_finite_floats_are_refused(tmp_path, overrides, expect):
    """YAML reads .inf and .nan as floats; no setting means either (an infinite lr ended in an
    OverflowError mid-run). Refused in every section, shown as the YAML that was written."""
    assert expect in error(spec_file(tmp_path), overrides)
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    tree["optimizer"]["lr"] = float("inf")  # in the file itself, not only through --set
    assert "optimizer.lr = .inf" in error(spec_file(tmp_path, tree))


@pytest.mark.parametrize("output", ["{nme}", "{0}", "{", "}", "{}", "runs/{name!r}", "runs/{name:>8}", "{name.x}"])
def test_output_takes_only_the_name_placeholder(tmp_path, output):
    msg = error(spec_file(tmp_path, {**BASE, "output": output}))
    assert msg.endswith(f"output = {json.dumps(output)}: the only placeholder is {{name}} "
                        "(write {{ and }} for literal braces)"), msg


def test_output_with_literal_braces(tmp_path):
    assert load_spec(spec_file(tmp_path, {**BASE, "output": "{{x}}/{name}"})).run_dir == Path("{x}/s")


def test_percent_in_output_is_refused(tmp_path):
    """SLURM expands % in log paths (#SBATCH --output names the run folder): refused under
    `mpidl train` too, so that a run started by hand can be continued by a submitted job."""
    msg = error(spec_file(tmp_path), ["output=runs/%j/{name}"])
    assert 'output = "runs/%j/{name}": % is refused: SLURM expands it' in msg, msg


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", ".hidden", "-x", "a b", "a%j", "a\\b", "a\tb",
                                  '""', "x" * 101, "é"])
def test_name_must_be_one_safe_folder_name(tmp_path, name):
    msg = error(spec_file(tmp_path), [f"name={name}"])
    assert msg.endswith(": a name is one folder name: up to 100 ASCII letters, digits and _ . - + = , @, "
                        "not starting with . - + = , @"), msg


def test_names_that_are_one_folder_name_pass(tmp_path):
    for name in ("demo", "lr=0.1,bs=64", "a+b@c", "_x.y-z", "x" * 100):
        assert load_spec(spec_file(tmp_path), [f"name={name}"]).run_dir == Path("runs") / name


def test_a_line_break_in_a_job_name_is_refused(tmp_path):
    """YAML folds a line break in a --set value into a space: refused rather than changed; a
    newline written as an escape reaches the name's own check."""
    for raw in ("name=a\nb", 'name="a\nb"', "slurm.job_name=a\nb", "name=a\r\nb"):
        assert "a line break in a --set value" in error(spec_file(tmp_path), [raw])
    assert "a name is one folder name" in error(spec_file(tmp_path), ['name="a\\nb"'])
    assert "a name is one folder name" in error(spec_file(tmp_path, {**BASE, "name": "a\nb"}))


def test_a_file_where_a_run_folder_would_be_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    cases = [(["output=" + str(tmp_path / "file")],
              f'output = "{tmp_path}/file": {tmp_path}/file is a file, not a folder'),
             (["output=" + str(tmp_path / "file/sub/{name}")],
              f"{tmp_path}/file is a file, so the folder {tmp_path}/file/sub/s cannot be made"),
             (["output=" + str(tmp_path / "run")], f"{tmp_path}/run/checkpoints is a file, not a folder"),
             (["checkpoint.dir=" + str(tmp_path / "file/ck")],
              f'checkpoint.dir = "{tmp_path}/file/ck": {tmp_path}/file is a file'),
             (["output=" + str(tmp_path / "link")], f"{tmp_path}/link is a broken link, not a folder")]
    for overrides, expect in cases:
        with pytest.raises(BadInput) as e:
            check_run_folders(load_spec(spec_file(tmp_path), overrides))
        assert expect in str(e.value), str(e.value)
    for fine in (["output=" + str(tmp_path / "new/deeper/{name}")], ["checkpoint.dir=" + str(tmp_path / "ck")]):
        check_run_folders(load_spec(spec_file(tmp_path), fine))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "job.yaml", "link", "run"]  # checks, creates nothing


def test_several_errors_are_counted_not_listed(tmp_path):
    msg = error(spec_file(tmp_path), ["optimizer.lr=-1", "data.batch=0"])
    assert "(and 1 more)" in msg


def test_file_problems(tmp_path):
    assert error(tmp_path / "missing.yaml").endswith("job spec not found")
    bad = tmp_path / "job.yaml"
    bad.write_text("name: demo\ndata: {files: [a, b\n")
    assert "not valid YAML at line" in error(bad)
    bad.write_text("- just\n- a list\n")
    assert "a job spec is a mapping of keys, got list" in error(bad)
    bad.write_text("")
    assert "missing key" in error(bad)


def test_fingerprint_tracks_what_a_checkpoint_depends_on(tmp_path):
    path = spec_file(tmp_path)
    base = load_spec(path).fingerprint()
    # length, backend, output, logging and checkpoint cadence may change across a resume
    for same in (["epochs=5"], ["backend=mpi"], ["output=elsewhere"], ["log_every=3"], ["checkpoint.every_steps=9"],
                 ["data.files=other.h5"], ["data.prefetch=1"]):
        assert load_spec(path, same).fingerprint() == base, same
    # model, optimizer, schedule, batch, preprocessing and seed may not
    for changed in (["model.args.hidden=[32]"], ["optimizer.lr=0.2"], ["schedule.kind=cosine"], ["data.batch=4"],
                    ["data.preprocess.flip=true"], ["seed=1"], ["accumulate=2"], ["precision=bf16"]):
        assert load_spec(path, changed).fingerprint() != base, changed


def test_schema_is_strict_in_python_too():
    with pytest.raises(ValidationError, match="extra_forbidden"):
        JobSpec.model_validate({**BASE, "extra": 1})
