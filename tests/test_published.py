"""Published scaling results as data, the model held against them, and the report's first screen
(the summary, its plot and the cost in node-hours), from the committed study: no run needed."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from chromium import find_chromium, first_screen, setup_installs_chromium
from conftest import ROOT, mpidl_cmd, run
from mpidl.errors import BadInput
from mpidl.scaling import model, published
from mpidl.scaling.report import APPENDIX, write_report

PUBLISHED = ROOT / "benchmarks" / "published"
FILES = sorted(PUBLISHED.glob("*.yaml"))
STUDY = ROOT / "benchmarks" / "results" / "cpu2-weak"

# The bound the model is held to on rows it was never fitted to (every input fixed a priori, each
# with its source or the reasoning of its estimate in the file). Measured when these files were
# written: mean |error| 5.2 points, max 10.7, against 4.5 and 22.0 for the α-β model before.
MEAN_BOUND, MAX_BOUND = 6.0, 12.0


def test_every_published_file_validates_and_says_where_each_figure_comes_from():
    assert {p.name for p in FILES} >= {"horovod-2018.yaml", "akiba-2017.yaml", "jia-2018.yaml", "mikami-2018.yaml"}
    for path in FILES:
        pub = published.load(path)
        assert pub.source.url.startswith("https://") and pub.models, path
        for m in pub.models:
            for fig in (m.params, m.bytes_per_param, m.batch_per_gpu, m.single_gpu_samples_per_s):
                assert (fig.source is None) != (fig.estimate is None), (path, m.name)
            for r in m.rows:
                assert 0 < r.efficiency <= 1 and r.source, (path, m.name)
    horovod = published.load(PUBLISHED / "horovod-2018.yaml")
    rows = {(m.name, r.gpus): r.efficiency for m in horovod.models for r in m.rows}
    assert rows == {("ResNet-101", 128): 0.90, ("ResNet-101", 512): 0.90, ("Inception V3", 128): 0.90,
                    ("Inception V3", 512): 0.90, ("VGG-16", 128): 0.79, ("VGG-16", 512): 0.68}  # anchors.md
    assert horovod.hardware.gpus_per_node.value == 4 and horovod.hardware.inter.name == "25 Gbit/s RoCE"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_predict_published_prints_each_row(path):
    r = run(mpidl_cmd("scale", "predict", "--published", str(path)))
    assert r.returncode == 0, r.output
    pub = published.load(path)
    lines = r.stdout.splitlines()
    assert lines[0].startswith(pub.title) and pub.source.url in lines[0]
    for m in pub.models:
        for row in m.rows:
            hit = [ln for ln in lines if re.match(rf"\s*{re.escape(m.name)}\s+{row.gpus}\s", ln)]
            assert len(hit) == 1, (m.name, row.gpus, r.stdout)
            assert f"{row.efficiency:.3f}" in hit[0]
    assert lines[-1].startswith("summary: ") and "mean |error|" in lines[-1] and "before (α-β only)" in lines[-1]
    assert "src/graph/tuning.cc" in r.stdout  # each term says where it comes from


def test_the_model_against_every_published_row():
    r = run(mpidl_cmd("scale", "predict", "--published", str(PUBLISHED), "--json"))
    assert r.returncode == 0, r.output
    res = json.loads(r.stdout)
    rows = [row for f in res["files"] for row in f["rows"]]
    assert len(rows) == res["summary"]["model"]["rows"] == 9
    for row in rows:  # the printed difference is the model's, in points
        assert row["error_points"] == pytest.approx(100 * (row["predicted"] - row["published"]))
        assert row["step_ms"] == pytest.approx(row["compute_ms"] + row["stragglers_ms"] + row["exposed_ms"])
    s, before = res["summary"]["model"], res["summary"]["alpha_beta"]
    assert s["mean_abs_points"] <= MEAN_BOUND and s["max_abs_points"] <= MAX_BOUND, s
    assert s["max_abs_points"] < before["max_abs_points"]  # no row as far off as the α-β model's worst
    # what the α-β model was blind to: VGG-16 loses 11 points from 128 to 512 GPUs over 25 Gb/s RoCE
    vgg = {row["gpus"]: row for row in rows if row["model"] == "VGG-16"}
    drop_pub = vgg[128]["published"] - vgg[512]["published"]
    assert abs((vgg[128]["predicted"] - vgg[512]["predicted"]) - drop_pub) < 0.03
    assert abs((vgg[128]["alpha_beta"] - vgg[512]["alpha_beta"]) - drop_pub) > 0.08
    # a missed row says what it would take, and which of its inputs are estimates
    missed = [row for row in rows if abs(row["error_points"]) > published.MISS_POINTS]
    assert all(row.get("would_match") for row in missed)


def test_what_a_missed_row_would_need_matches_when_fed_back():
    pub = published.load(PUBLISHED / "horovod-2018.yaml")
    vgg = next(m for m in pub.models if m.name == "VGG-16")
    need = published.would_match(pub, vgg, 512, 0.68)
    work, machine, overlap, bucket, cycle = published.inputs(pub, vgg)
    faster = model.Link(machine.inter.name, machine.inter.alpha, need["inter_GBps_per_nic"] * model.GB,
                        kind=machine.inter.kind)
    got = model.predict(work, model.Machine(4, machine.intra, faster, machine.collective), [512], overlap, bucket,
                        cycle_s=cycle)[0]["predicted"]["efficiency"]
    assert got == pytest.approx(0.68, abs=1e-4)


def _bad(tmp_path: Path, edit) -> tuple[Path, "object"]:
    tree = yaml.safe_load((PUBLISHED / "horovod-2018.yaml").read_text())
    edit(tree)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return path, run(mpidl_cmd("scale", "predict", "--published", str(path)))


@pytest.mark.parametrize("edit,expect", [
    (lambda t: t["hardware"]["inter"]["bandwidth_GBps"].pop("source"),
     "hardware.inter.bandwidth_GBps = {'value': 2.8}: give source (where the figure is published) or estimate"),
    (lambda t: t["hardware"]["inter"]["bandwidth_GBps"].update(value=-1),
     "hardware.inter.bandwidth_GBps.value = -1: Input should be greater than 0"),
    (lambda t: t["models"][0]["rows"][0].update(gpus=130),
     "models.0.rows.0.gpus = 130: not a whole number of nodes of 4 GPUs"),
    (lambda t: t["hardware"].update(gpus_per_nod=t["hardware"].pop("gpus_per_node")),
     "unknown key 'hardware.gpus_per_nod' — did you mean 'hardware.gpus_per_node'?"),
    (lambda t: t["software"]["algorithms"].update(value=["butterfly"]),
     "software.algorithms.value.0 = \"butterfly\": Input should be 'ring', 'tree'"),
    (lambda t: t["models"][2]["rows"][1].update(efficiency=1.7),
     "models.2.rows.1.efficiency = 1.7: Input should be less than or equal to 1.2"),
])
def test_a_bad_published_file_is_one_line(tmp_path, edit, expect):
    path, r = _bad(tmp_path, edit)
    assert r.returncode == 2 and r.stdout == "", r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {path}: "), r.stderr
    assert expect in r.stderr, r.stderr


def test_published_input_errors_are_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("title: [unclosed\n")
    (tmp_path / "empty").mkdir()
    for args, expect in (([str(tmp_path / "none.yaml")], "none.yaml: published results not found"),
                         ([str(tmp_path / "broken.yaml")], "broken.yaml: not valid YAML at line 2"),
                         ([str(tmp_path / "empty")], "empty: no published *.yaml files here"),
                         ([str(PUBLISHED), "--overlap", "0"], "--overlap does not apply")):
        r = run(mpidl_cmd("scale", "predict", "--published", *args))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and expect in r.stderr, r.output


def test_a_broken_published_file_leaves_the_report_a_line_saying_so(tmp_path):
    from mpidl.scaling import summary

    (tmp_path / "bad.yaml").write_text("title: x\n")
    v = summary.validation([tmp_path / "bad.yaml"])
    assert v["error"].startswith(f"{tmp_path / 'bad.yaml'}: missing key")
    assert summary.validation_line(v).startswith("The model's record against published results is unavailable: ")
    assert summary.validation_view(v)[1] == [] and summary.rows_view(v)[1] == []


# ---------------------------------------------------------------- the report's first screen

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "cpu2-weak"
    shutil.copytree(STUDY, out, ignore=shutil.ignore_patterns("runs"))
    write_report(out, target=64)
    return out


def test_report_opens_with_the_summary_and_ends_with_mpidls_own_goals(report):
    md = (report / "report.md").read_text()
    head = md.split("## Points")[0]
    assert head.index("## Summary") < head.index("![") and "E ≥ 80%" in head
    assert "Cost of one epoch of 24,000 samples (the job's synthetic rows less validation" in head
    assert "node-hours at 2 ranks" in head and "| ranks | nodes | samples/s | E | wall time | node-hours |" in head
    assert "At the target 64 ranks: E = " in head
    assert "Held against 9 published rows from 4 papers (never fitted to them)" in head
    assert "| Horovod (Sergeev & Del Balso 2018) | 6 |" in head
    assert "Goals, as measured" not in head and "Not met" not in head
    tail = md.split(f"## {APPENDIX}")[1]
    assert "### Goals, as measured" in tail and "Not met: horovod E ≥ ddp E at 2 ranks" in tail
    assert "### The model against published results" in md and "| Mikami et al. 2018 | ResNet-50 | 1,088 |" in md
    page = (report / "report.html").read_text()
    assert page.index("id='summary'") < page.index("<h2>Points") < page.index("id='appendix'")
    assert "src=\"http" not in page and "<link" not in page and "<script" not in page  # self-contained


def test_report_says_why_each_missed_row_misses(report):
    """The issue's bar: a published row the model misses by more than the bound gets its reason
    in the report itself, not only in `mpidl scale predict`."""
    from mpidl.scaling import summary

    v = summary.validation()
    missed = [r for r in v["rows"] if abs(r["error_points"]) > v["bound"]]
    assert missed and len(missed) < len(v["rows"])
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    section = md.split("### The model against published results")[1].split("\n## ")[0]
    for r in missed:
        line = (f"{r['paper']}, {r['model']} at {r['gpus']:,} GPUs misses by {r['error_points']:+.1f} points: "
                + published.why(r))
        assert f"- {line}" in section, line
        assert f"{r['model']} at {r['gpus']:,} GPUs misses by {r['error_points']:+.1f} points" in page
    assert section.count(" misses by ") == len(missed)  # rows within the bound get no line


def test_report_cost_is_time_times_nodes(report):
    doc = json.loads((report / "study.json").read_text())
    from mpidl.scaling import summary
    from mpidl.scaling.efficiency import on_one_node
    from mpidl.scaling.report import prediction

    pred, _ = prediction(on_one_node(doc), report / "allreduce.json", (64,))
    s = summary.build(doc, pred, samples=1e6, target=64)
    by = {c["size"]: c for c in s["cost"]}
    assert by[2]["source"] == "measured" and by[64]["source"] == "model" and by[64]["nodes"] == 32
    for c in s["cost"]:
        assert c["wall_h"] == pytest.approx(1e6 / c["throughput"] / 3600)
        assert c["node_hours"] == pytest.approx(c["wall_h"] * c["nodes"])
        assert c["rank_hours"] == pytest.approx(c["wall_h"] * c["size"])
    with pytest.raises(BadInput, match="--epochs needs the samples in an epoch"):
        summary.work({"study": {}, "job": {"data": {"files": "x.h5"}}}, None, 3)


def test_report_bad_work_is_one_line(report):
    r = run(mpidl_cmd("report", str(report), "--target", "3"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.output
    assert "report: --target 3: size 3 is not a whole number of nodes of 2 ranks" in r.stderr


def test_the_summary_and_its_plot_fill_the_first_screen(report, tmp_path):
    browser = find_chromium()
    if browser is None and setup_installs_chromium():
        pytest.fail("chromium is missing, yet scripts/setup.sh installs it on this machine: run `make setup`")
    if browser is None:
        pytest.skip("chromium not installed, and scripts/setup.sh cannot install it here")
    ids = ["headline", "cost", "headline-plot", "validation", "appendix"]
    for size in ((1280, 800), (1440, 900)):
        g = first_screen(report / "report.html", tmp_path, browser, ids, size)
        box = g["boxes"]
        for name in ("headline", "cost", "headline-plot", "validation"):
            top, bottom, left, right = box[name]
            assert 0 <= top and bottom <= g["height"] and right <= g["width"], (size, name, g)
        assert box["headline-plot"][1] - box["headline-plot"][0] > 200, g  # the plot, not a sliver of it
        assert box["appendix"][0] > g["height"]  # mpidl's own goals are below the fold


def test_the_headline_plot_of_a_study_with_no_single_rank_run():
    """A study of one size on 1 and 2 nodes has no best backend to plot: the plot says so (a log axis
    of nothing ended `mpidl report` with a matplotlib error)."""
    from mpidl.scaling import plots

    doc = {"table": [{"backend": "mpi", "size": 2, "throughput": 100.0}], "study": {}, "environment": {}}
    s = {"cost": [], "target": None, "measured": [], "flag_below": 0.8, "backend": None}
    assert plots.plot_summary(doc, None, s).startswith(b"\x89PNG")
    # measured, but no efficiency (no one-rank point): the efficiency axis holds no point
    s["measured"] = [{"size": 2, "nodes": n, "efficiency": None, "throughput": 100.0, "oversubscribed": False}
                     for n in (1, 2)]
    s["backend"] = "mpi"
    assert plots.plot_summary(doc, None, s).startswith(b"\x89PNG")
