"""`mpidl quantize RUN_DIR` on runs trained under real mpirun: dynamic int8 of an MLP, static int8
of a CNN, measured on the held-out split; and a folder without a checkpoint."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from conftest import cli_in_turn, mpidl_cmd, mpirun, run
from mpidl.errors import BadInput


def job(folder, name: str, data: dict, model: dict) -> list[str]:
    spec = {"name": name, "seed": 0, "epochs": 2, "backend": "mpi", "data": data, "model": model,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "output": str(folder / name),
            "log_every": 100}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return ["train", str(path)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """name -> its run folder: a CNN on images and an MLP on a table, trained in turn by one launch."""
    folder = tmp_path_factory.mktemp("quantize")
    cnn = job(folder, "cnn", {"files": str(folder / "img.h5"), "batch": 32, "val_fraction": 0.2,
                              "synth": {"kind": "images", "rows": 3000, "classes": 4, "channels": 3, "size": 16,
                                        "noise": 80}},
              {"name": "small_cnn", "args": {"width": 16}})
    mlp = job(folder, "mlp", {"files": str(folder / "tab.h5"), "batch": 32, "val_fraction": 0.2,
                              "synth": {"kind": "tabular", "rows": 3000, "features": 32, "classes": 3}},
              {"name": "mlp", "args": {"hidden": [256, 256], "num_classes": 3}})
    cli_in_turn(2, [cnn, mlp])
    return {name: folder / name for name in ("cnn", "mlp")}


def report_of(out: str) -> dict:
    return json.loads(out[out.index("{"):])


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")  # loading the saved int8 tensors
def test_static_int8_of_a_cnn(trained):
    folder = trained["cnn"]
    r = mpirun(2, mpidl_cmd("quantize", str(folder), "--json", "--calibrate", "256"), timeout=300)
    assert r.returncode == 0, r.output[-3000:]
    rep = report_of(r.stdout)
    assert rep == json.loads((folder / "quantize.json").read_text())
    v = rep["variants"]
    assert set(v) == {"fp32", "dynamic_int8", "static_int8"} and rep["static_int8"] is None
    own = json.loads((folder / "summary.json").read_text())["final"]["val_accuracy"]
    assert v["fp32"]["val_accuracy"] == pytest.approx(own, abs=1e-12)  # the run's own held-out figure
    assert own > 0.5
    for name in ("dynamic_int8", "static_int8"):
        assert abs(v[name]["val_accuracy"] - own) <= 0.05, (name, v[name])
    assert v["static_int8"]["size_bytes"] < 0.6 * v["fp32"]["size_bytes"]  # int8 weights, plus qparams
    assert all(v[n]["latency_ms"][b] > 0 for n in v for b in ("1", "64"))
    assert rep["held_out_rows"] == 600 and rep["calibration_rows"] == 256
    state = torch.load(folder / "quantized" / "static_int8.pt", weights_only=False)
    assert any(t.is_quantized for t in state.values() if torch.is_tensor(t))


def test_dynamic_int8_of_an_mlp_alone(trained):
    folder = trained["mlp"]
    r = run(mpidl_cmd("quantize", str(folder)), timeout=300)  # one process, no launcher
    assert r.returncode == 0, r.output[-3000:]
    assert "dynamic_int8" in r.stdout and "no convolutions" in r.stdout and "Warning" not in r.output
    rep = json.loads((folder / "quantize.json").read_text())
    v = rep["variants"]
    assert set(v) == {"fp32", "dynamic_int8"}
    assert abs(v["dynamic_int8"]["val_accuracy"] - v["fp32"]["val_accuracy"]) <= 0.03
    assert v["dynamic_int8"]["size_bytes"] < 0.4 * v["fp32"]["size_bytes"]  # int8 weights: about a quarter


def test_run_folder_without_checkpoint(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "summary.json").write_text("{}")
    r = mpirun(2, mpidl_cmd("quantize", str(folder)), timeout=120)
    assert r.returncode == 2, r.output[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no checkpoint (ckpt-*.pt)" in errors[0]
    assert not (folder / "quantize.json").exists()


def test_no_run_folder(tmp_path):
    """The door of a folder without a checkpoint (exit 2 on every rank, above): here, what it says."""
    from mpidl.quant.quantize import KEY
    from mpidl.train.runs import load_run

    where = re.escape(f"{KEY}: {tmp_path / 'run'}")
    with pytest.raises(BadInput, match=f"^{where}: no such run folder"):
        load_run(str(tmp_path / "run"), KEY)
