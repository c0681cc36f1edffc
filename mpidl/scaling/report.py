"""`mpidl report STUDY_DIR`: plots, CSV, Markdown and a self-contained HTML page of a study.

Writes into STUDY_DIR: summary.png, throughput.png, efficiency.png, breakdown.png, allreduce.png
(when an allreduce measurement is there), prediction.png, points.csv, runs.csv, report.md and
report.html (the same content, images embedded, nothing fetched from elsewhere).

The sections are built once (`sections`: a `document.Document` of headings, paragraphs, tables,
figure references and notes) and rendered to Markdown and to HTML by `mpidl.scaling.document`;
the figures are drawn by `mpidl.scaling.plots`, the first screen's numbers come from
`mpidl.scaling.summary`.

A study that placed sizes on several node counts labels its rows and plot series by placement,
adds a "crossing nodes" section (and crossing.csv), and gives the model its one-node points.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Optional

from mpidl.errors import BadInput
from mpidl.scaling import document, efficiency, model, plots, summary
from mpidl.scaling.document import (
    Box,
    Bullets,
    Code,
    Columns,
    Definitions,
    Document,
    Figure,
    File,
    Files,
    Heading,
    KeyValues,
    Notes,
    Paragraph,
    Preformatted,
    Table,
)
from mpidl.scaling.efficiency import BASELINE
from mpidl.scaling.plots import label_of, multinode, nodes_text

POINT_COLUMNS = ["backend", "size", "oversubscribed", "repetitions", "throughput", "throughput_min", "throughput_max",
                 "step_time", "data", "compute", "sync", "optimizer", "speedup", "efficiency",
                 "efficiency_vs_lone_rank", "machine_limit", "of_limit", "comm_share", "sync_share", "karp_flatt",
                 "flagged"]
CROSSING_COLUMNS = ["backend", "size", "nodes", "ranks_per_node", "throughput_one_node", "throughput", "ratio",
                    "step_time_one_node", "step_time", "sync_one_node", "sync", "comm_share_one_node", "comm_share",
                    "exposed_one_node", "exposed", "crossing_cost"]
RUN_COLUMNS = ["order", "rep", "size", "backend", "oversubscribed", "batch_per_rank", "global_batch", "returncode",
               "seconds", "load_before", "load_after", "throughput", "step_time", "data", "compute", "sync",
               "optimizer", "breakdown_source", "windows", "error", "run_dir"]


def load(study_dir: Path) -> dict:
    path = study_dir / "study.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no study here (run `mpidl scale STUDY.yaml` first)") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: unreadable study ({e})") from None
    if doc.get("kind") != "mpidl scaling study" or "table" not in doc:
        raise BadInput(f"{path}: not an mpidl scaling study")
    return doc

def _on(nodes: int, multi: bool) -> str:
    """' on n nodes' where the study has several placements, else nothing."""
    return f" on {nodes_text(nodes)}" if multi else ""


def _where(size: int, nodes: int, multi: bool) -> str:
    return f"{size}{_on(nodes, multi)}"


def prediction(doc: dict, allreduce: Optional[Path], extra: tuple[int, ...] = ()) -> tuple[Optional[dict], str]:
    """The model's rows from the study's inputs out to predict.max_ranks (and any `extra` size), or why not."""
    try:
        work, machine, assumed = model.from_study(doc, allreduce=allreduce)
        measured = sorted({r["size"] for r in doc["table"]})
        top = assumed["max_ranks"]
        sizes = sorted(set(model.powers_of_two(top)) | set(measured) | set(extra))
        sizes = [p for p in sizes if p <= machine.ranks_per_node or p % machine.ranks_per_node == 0]
        cycle = (doc["study"].get("predict") or {}).get("cycle_ms", 0) * 1e-3
        rows = model.predict(work, machine, sizes, assumed["overlap"], assumed["bucket_mb"] * 2**20, cycle_s=cycle)
    except BadInput as e:
        return None, str(e)
    return {"assumed": assumed, "rows": rows, "fits": model.serial_fractions(doc["table"], doc["study"]["mode"])}, ""


# ---------------------------------------------------------------- tables and text

def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits + 1}g}"
    return str(v)


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return buf.getvalue()


def _run_rows(doc: dict) -> list[dict]:
    out = []
    for r in doc["runs"]:
        row = {**r, **(r.get("breakdown") or {})}
        row["windows"] = len(r.get("windows") or [])
        out.append(row)
    return out


def _with_nodes(columns: list[str], multi: bool, extra: tuple[str, ...] = ("nodes", "ranks_per_node")) -> list[str]:
    """CSV columns, with the placement after the size where the study has several."""
    if not multi:
        return columns
    i = columns.index("size") + 1
    return [*columns[:i], *extra, *columns[i:]]


def _points_view(doc: dict) -> tuple[list[str], list[list[str]]]:
    multi = multinode(doc["table"])
    head = ["backend", "p", *(["nodes × ranks"] if multi else []), "samples/s (min–max)", "ms/step", "data",
            "compute", "sync", "opt", "S(p)", "E(p)", "E*(p)", "L(p)", "X/X₀", "comm share", "sync share", "KF"]
    body = []
    for r in doc["table"]:
        flags = (" ⚑" if r["flagged"] else "") + (" (oversubscribed)" if r["oversubscribed"] else "")
        n = r.get("nodes", 1)
        body.append([label_of(r["backend"]), f"{r['size']}{flags}", *([f"{n} × {r['size'] // n}"] if multi else []),
                     f"{_fmt(r['throughput'])} ({_fmt(r['throughput_min'])}–{_fmt(r['throughput_max'])})",
                     _fmt(1e3 * r["step_time"]),
                     *[_fmt(1e3 * r[k]) if r.get(k) is not None else "–" for k in efficiency.BUCKETS],
                     _fmt(r.get("speedup")), _fmt(r.get("efficiency")), _fmt(r.get("efficiency_vs_lone_rank")),
                     _fmt(r.get("machine_limit")), _fmt(r.get("of_limit")), _fmt(r.get("comm_share")),
                     _fmt(r.get("sync_share")), _fmt(r.get("karp_flatt"))])
    return head, body


def _goals_view(doc: dict, ar: Optional[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["goal", "size", "measured", "target", "met"]
    multi = multinode(doc["table"])
    body = [[g["goal"],
             _where(g["size"], g.get("nodes", 1), multi) + (" (oversubscribed)" if g["oversubscribed"] else ""),
             _fmt(g["value"]), _fmt(g["target"]), "yes" if g["met"] else "NO"] for g in doc.get("goals", [])]
    for g in _allreduce_goals(ar):
        body.append([g["goal"], f"{g['ranks']} ranks, {g['bytes'] // 2**20} MiB", _fmt(g["value"]), _fmt(g["target"]),
                     "yes" if g["met"] else "NO"])
    return head, body


def _allreduce_goals(ar: Optional[dict]) -> list[dict]:
    """The goal is judged on Horovod as mpidl runs it; other variants are notes."""
    return [g for g in (ar or {}).get("goals", []) if g.get("variant", "horovod") == "horovod"]


def _other_variants(ar: Optional[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for g in (ar or {}).get("goals", []):
        if g.get("variant", "horovod") != "horovod":
            out.setdefault(g["variant"], []).append(g)
    return out


def _crossing_view(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["backend", "p", "nodes × ranks", "samples/s, 1 node", "samples/s, n nodes", "R = X(p,n)/X(p,1)",
            "ms/step, 1 node", "ms/step, n nodes", "sync ms, 1 node", "sync ms, n nodes", "c, 1 node", "c, n nodes",
            "C ms, 1 node", "C ms, n nodes", "ΔC ms"]
    ms = lambda v: _fmt(None if v is None else 1e3 * v)  # noqa: E731
    body = [[label_of(r["backend"]), str(r["size"]), f"{r['nodes']} × {r['ranks_per_node']}",
             _fmt(r["throughput_one_node"]), _fmt(r["throughput"]), _fmt(r["ratio"]), ms(r["step_time_one_node"]),
             ms(r["step_time"]), ms(r["sync_one_node"]), ms(r["sync"]), _fmt(r["comm_share_one_node"]),
             _fmt(r["comm_share"]), ms(r["exposed_one_node"]), ms(r["exposed"]), ms(r["crossing_cost"])]
            for r in rows]
    return head, body


def _crossing_lines(rows: list[dict]) -> list[str]:
    """Each crossing row in a sentence."""
    out = []
    for r in rows:
        head = (f"{label_of(r['backend'])}: {r['size']} ranks on {nodes_text(r['nodes'])} ({r['ranks_per_node']} each) "
                f"run at {_fmt(r['ratio'])} of the pace of {r['size']} ranks on one node "
                f"({_fmt(r['throughput'])} against {_fmt(r['throughput_one_node'])} samples/s)")
        if r["crossing_cost"] is not None:
            head += (f"; exposed communication {_fmt(1e3 * r['exposed_one_node'])} → {_fmt(1e3 * r['exposed'])} ms "
                     f"per step (ΔC = {_fmt(1e3 * r['crossing_cost'])} ms), communication share "
                     f"{_fmt(r['comm_share_one_node'])} → {_fmt(r['comm_share'])}")
        elif r["backend"] == BASELINE:
            head += "; the baseline sends nothing, so this is what the placement alone changes"
        out.append(head + ".")
    return out


def _prediction_view(pred: dict) -> tuple[list[str], list[list[str]]]:
    head = ["ranks", "nodes", "T_c ms", "ring ms", "hier ms", "T ms (best, ω)", "samples/s", "E (best, ω)",
            "E ring no overlap", "best"]
    body = []
    for r in pred["rows"]:
        pr, no = r["predicted"], r["ring_no_overlap"]
        body.append([str(r["size"]), str(r["nodes"]), _fmt(1e3 * r["compute_s"]), _fmt(1e3 * r["allreduce_ring_s"]),
                     _fmt(1e3 * r["allreduce_hierarchical_s"]), _fmt(1e3 * pr["step_s"]), _fmt(pr["throughput"]),
                     _fmt(pr["efficiency"]), _fmt(no["efficiency"]), r["best"]])
    return head, body


def _env_view(doc: dict) -> list[tuple[str, str]]:
    e = doc["environment"]
    keys = ["host", "cpu_model", "cores", "cpu_count", "gpu", "gpus", "os", "python", "torch", "cuda", "nccl", "mpi",
            "mpi4py", "horovod", "numpy", "h5py", "commit"]
    out = [(k, str(e.get(k))) for k in keys if k in e]
    launcher = e.get("launcher") or {}
    if launcher.get("name") == "slurm":
        out.append(("launcher", f"slurm ({launcher.get('version')}): partition {launcher.get('partition')}, nodes "
                                f"{', '.join(launcher.get('nodes') or []) or '?'} "
                                f"({launcher.get('cpus_per_node')} CPUs "
                                f"each); {launcher.get('launch')}"))
    else:
        out.append(("launcher", f"{launcher.get('name')} ({launcher.get('version')}) "
                                f"{' '.join(launcher.get('args', []))}"))
    if "tuning_env" in e:
        out.append(("tuning environment", " ".join(f"{k}={v}" for k, v in e["tuning_env"].items()) or "none set"))
    out.append(("started / finished", f"{doc.get('started')} / {doc.get('finished', 'not finished')}"))
    return out


def _settings(doc: dict) -> list[tuple[str, str]]:
    s = doc["study"]
    job = doc["job"]
    batch = (f"{s['batch_per_rank'] or job['data']['batch']} per rank" if s["mode"] == "weak"
             else f"{s['global_batch']} global (÷ p per rank)")
    what = ("command", doc["job_file"]) if "command" in job else \
        ("job", f"{doc['job_file']} ({job['model']['name']}, {job['precision']})")
    return [what,
            ("overrides", " ".join(s["set"]) or "–"), ("mode", s["mode"]), ("batch", batch),
            ("sizes", ", ".join(map(str, s["sizes"]))),
            *([("nodes", ", ".join(map(str, s["launcher"]["nodes"])) + " (each size at every node count that "
                         "divides it)")] if multinode(doc["table"]) else []),
            ("backends", ", ".join(s["backends"]) + (" + no-comm baseline" if s["baseline"] else "")),
            ("steps", f"{s['warmup_steps']} warm-up + {s['steps']} measured, windows of {s['window']}"),
            ("repetitions", f"{s['repetitions']} (interleaved: sizes up/down alternately, backends rotated)"),
            ("threads per rank", str(s["threads_per_rank"] or "unset")),
            ("breakdown from", doc["points"][0]["breakdown_source"] if doc["points"] else "–"),
            ("gradient parameters", _fmt((doc.get("model_inputs") or {}).get("grad_params")))]


def _notes(doc: dict, ar: Optional[dict]) -> list[str]:
    """What falls short, said plainly, from the numbers."""
    notes = []
    multi = multinode(doc["table"])
    for g in doc.get("goals", []):
        if not g["met"]:
            r: dict = next((r for r in doc["table"] if r["backend"] == g["goal"].split()[0] and r["size"] == g["size"]
                      and r.get("nodes", 1) == g.get("nodes", 1)), {})
            why = (f" There its step takes {_fmt(1e3 * r.get('step_time', 0))} ms "
                   f"(data {_fmt(1e3 * (r.get('data') or 0))}, "
                   f"compute {_fmt(1e3 * (r.get('compute') or 0))}, sync {_fmt(1e3 * (r.get('sync') or 0))}, optimizer "
                   f"{_fmt(1e3 * (r.get('optimizer') or 0))} ms); its communication share c = 1 − T₀/T is "
                   f"{_fmt(r.get('comm_share'))}.") if r else ""
            notes.append(f"Not met: {g['goal']} at {g['size']} ranks{_on(g.get('nodes', 1), multi)}: "
                         f"{_fmt(g['value'])} vs {_fmt(g['target'])}."
                         + (" (oversubscribed point)" if g["oversubscribed"] else "") + why)
    for g in _allreduce_goals(ar):
        if not g["met"]:
            notes.append(f"Not met: {g['goal']} at {g['ranks']} ranks, {g['bytes'] // 2**20} MiB: {_fmt(g['value'])}.")
    for v, gs in _other_variants(ar).items():
        notes.append(f"Other Horovod setting {v}: busbw / raw MPI at ≥ 16 MiB {_fmt(min(g['value'] for g in gs))}"
                     f"–{_fmt(max(g['value'] for g in gs))} (see allreduce.json).")
    at1 = {r["backend"]: r for r in doc["table"] if r["size"] == 1}
    if "mpi" in at1 and BASELINE in at1:
        ratio = at1["mpi"]["throughput"] / at1[BASELINE]["throughput"]
        notes.append(f"Noise floor: at 1 rank the mpi backend and the baseline run the same code (nothing is "
                     f"sent), yet their medians differ: X_mpi(1) / X₀(1) = {_fmt(ratio)}. Differences between "
                     f"backends smaller than |1 − {_fmt(ratio)}| = {_fmt(abs(1 - ratio))} are not resolved by "
                     "this study.")
    ranges = [(r["throughput_max"] - r["throughput_min"]) / r["throughput"] for r in doc["table"]
              if r.get("repetitions", 1) > 1 and r["throughput"]]
    if ranges and statistics.median(ranges) > 0.1:
        notes.append(f"Spread: the repetitions of one point range over {_fmt(statistics.median(ranges))} of their "
                     f"median (max − min, the median over points; {_fmt(min(ranges))}–{_fmt(max(ranges))}), so a "
                     "single goal comparison near its target can flip between two runs of this study.")
    loads = [r["load_before"] for r in doc["runs"] if r.get("load_before") is not None]
    cores = doc["environment"].get("cores") or 1
    if loads and statistics.median(loads) > cores:
        notes.append(f"The machine was shared: the load average before a run was {statistics.median(loads):.1f} "
                     f"(median; {min(loads):.1f}–{max(loads):.1f}) on {cores} cores, so other processes competed "
                     "with the ranks for the cores. Figures are medians of interleaved repetitions; ratios between "
                     "backends at one size are more trustworthy than absolute rates.")
    over = sorted({r["size"] for r in doc["table"] if r["oversubscribed"]})
    if over:
        notes.append(f"Sizes {over} run more ranks than the {doc['environment'].get('cores')} cores: "
                     "ranks share cores, "
                     "so these points measure time slicing, not scaling; they are shown hatched or hollow.")
    flagged = [r for r in doc["table"] if r["flagged"] and r["backend"] != BASELINE]
    for r in flagged:
        notes.append(f"Flagged: {r['backend']} at p={r['size']}{_on(r.get('nodes', 1), multi)}: "
                     f"E* = {_fmt(r.get('efficiency_vs_lone_rank'))} "
                     f"< {doc['study'].get('flag_below')}.")
    failed = [r for r in doc["runs"] if r.get("throughput") is None]
    for r in failed:
        notes.append(f"Run {r['run_dir']} failed: {r.get('error')}.")
    return notes


APPENDIX = "Appendix: mpidl's own benchmark goals"
APPENDIX_INTRO = ("What mpidl holds itself to (its backends against DDP and against the no-communication baseline, "
                  "Horovod's busbw against raw MPI), as this study measured them: for mpidl's developers, not a "
                  "statement about the job.")

CROSSING_TITLE = "Crossing nodes: p ranks on n nodes against the same p on one node"
CROSSING_INTRO = ("The same ranks and cores, placed differently: on one node the ranks talk through shared memory, "
                  "across nodes over the network between them. The baseline sends nothing; its "
                  "ratio shows what the placement changes apart from communication.")


def _model_intro(pred: Optional[dict], multi: bool) -> str:
    """The model's inputs and the scaling-law fits, in a paragraph ("" without a prediction)."""
    if pred is None:
        return ""
    a = pred["assumed"]
    text = (f"Inputs: compute {_fmt(1e3 * a['compute_s'])} ms per step ({a['compute_source']}); "
            f"{_fmt(a['grad_params'])} gradient parameters × {a['bytes_per_param']} B = "
            f"{a['grad_bytes'] / 2**20:.2f} MiB per step; {a['ranks_per_node']} ranks per node; intra "
            f"{a['intra']['name']} (α {a['intra']['alpha'] * 1e6:.2f} µs, "
            f"{a['intra']['bandwidth_GBps']:.2f} GB/s); inter {a['inter']['name']} "
            f"(α {a['inter']['alpha'] * 1e6:.2f} µs, {a['inter']['bandwidth_GBps']:.2f} GB/s per node); "
            f"overlap ω = {a['overlap']:.2f}; buckets of {a['bucket_mb']} MiB; {a['library']} "
            f"[{', '.join(a['algorithms'])}]; stragglers σ = {a['jitter_cv']:.3g} ({a['jitter_source']}); "
            f"contention L = "
            f"{ {k: round(v, 3) for k, v in (a['contention_limit'] or {}).items()} or 'none measured'}.")
    fits = "; ".join(f"{f['law'].capitalize()} fit of {label_of(b)}: s = {f['serial_fraction']:.4g} "
                     f"({f['points']} points)" for b, f in pred["fits"].items())
    text += (" " + fits + ".") if fits else ""
    if multi:
        text += " The model and the fits take the one-node points; the others are under crossing nodes."
    return text


def _allreduce_text(ar: Optional[dict]) -> str:
    """The bench_allreduce fits and Horovod settings, in a line ("" without a measurement)."""
    if ar is None:
        return ""
    fits = ar.get("fits", {})
    text = "; ".join(f"{b} p={p}: α = {f['alpha_s'] * 1e6:.1f} µs, B = "
                     + (f"{f['bandwidth_GBps']:.2f} GB/s" if f["bandwidth_GBps"] else "unreadable (noise)")
                     for b, by in fits.items() for p, f in by.items())
    tuning = ar.get("horovod_settings")
    if tuning:
        text += f". Horovod settings: {json.dumps(tuning)}"
    return text


def sections(doc: dict, ar: Optional[dict], pred: Optional[dict], why_not: str, top: dict,
             valid: Optional[dict], captions: dict[str, str], files: list[File]) -> Document:
    """The report, once: the summary first, mpidl's own goals last. captions: each figure's file
    name and caption, summary.png first; files: the raw numbers."""
    s = doc["study"]
    env = doc["environment"]
    multi = multinode(doc["table"])
    cross = efficiency.crossing(doc["table"], BASELINE)
    title = f"Scaling study {s['name']}: {s['mode']} scaling of " + (
        doc["job_file"] if "command" in doc["job"] else doc["job"]["model"]["name"])
    machine = (f"Machine: {env.get('cpu_model')}, {env.get('cores')} cores"
               + (f", {env.get('gpu')}" if env.get("gpu") else "") + f"; commit {env.get('commit')}.")
    sent = top["sentences"]
    val_line = summary.validation_line(valid)
    unit = summary.unit_of(doc)
    rows_h, rows_b = summary.rows_view(valid)

    out: list = [Paragraph(machine, "machine")]
    if not doc.get("complete"):
        out.append(Paragraph("This study did not finish: the figures cover the runs done so far.", "note"))
    out.append(Box("summary", "Summary", [
        Paragraph(sent["headline"], "headline", id="headline"),
        Paragraph(sent["cost"], "headline", id="cost"),
        Columns([Figure("summary.png", captions["summary.png"], id="headline-plot", heading=False)],
                [Table(*summary.cost_view(top, unit)), Paragraph(val_line, id="validation"),
                 Table(*summary.validation_view(valid))]),
        Paragraph(sent["assumptions"], "small")]))
    out += [Heading(2, "Points (medians over repetitions)"), Table(*_points_view(doc)),
            Paragraph("⚑: efficiency E* below the flag threshold. Times in ms.")]
    if cross:
        out += [Heading(2, CROSSING_TITLE), Paragraph(CROSSING_INTRO), Bullets(_crossing_lines(cross)),
                Table(*_crossing_view(cross)), Definitions(list(efficiency.CROSSING_FORMULAS))]
    out += [Figure(name, caption) for name, caption in captions.items() if name != "summary.png"]
    out += [Heading(2, "Formulas"), Definitions(list(efficiency.FORMULAS))]
    out += [Heading(2, "The model"), Paragraph(_model_intro(pred, multi) or f"No prediction: {why_not}"),
            Preformatted(model.FORMULAS)]
    if pred is not None:
        out.append(Table(*_prediction_view(pred)))
    if rows_b:
        assert valid is not None  # rows_view gives rows only from a validation
        predict = Code("mpidl scale predict --published benchmarks/published")
        out += [Heading(3, "The model against published results"), Paragraph(val_line), Table(rows_h, rows_b)]
        misses = summary.misses_view(valid)
        if misses:
            out.append(Bullets(misses))
        out.append(Paragraph(("Every input, with its source or the reasoning of its estimate: "
                              "benchmarks/published/*.yaml; ", predict, " prints each row's step, term by term.")))
    ar_text = _allreduce_text(ar)
    if ar_text:
        out += [Heading(2, "Allreduce fits (bench_allreduce)"), Paragraph(ar_text)]
    out += [Heading(2, "Settings"), KeyValues(_settings(doc)), Heading(2, "Environment"), KeyValues(_env_view(doc)),
            Files("Raw numbers", files, shown=["points.csv", "runs.csv"])]
    out += [Heading(2, APPENDIX, id="appendix"), Paragraph(APPENDIX_INTRO), Heading(3, "Goals, as measured"),
            Table(*_goals_view(doc, ar), empty="No goal applies to this study."),
            Heading(3, "What falls short, and why"), Notes(_notes(doc, ar), empty="Nothing.")]
    return Document(title, out)


def write_report(study_dir: Path, allreduce: Optional[Path] = None, samples: Optional[float] = None,
                 epochs: Optional[float] = None, target: Optional[int] = None) -> list[Path]:
    doc = load(study_dir)
    if not doc["table"]:
        raise BadInput(f"{study_dir / 'study.json'}: no successful run to report")
    ar_path = allreduce or (study_dir / "allreduce.json")
    ar = None
    if ar_path.exists():
        try:
            ar = json.loads(ar_path.read_text())
            ar["summary"]
        except (OSError, ValueError, KeyError):
            raise BadInput(f"{ar_path}: not a bench_allreduce result") from None
    elif allreduce is not None:
        raise BadInput(f"{allreduce}: allreduce results not found")

    multi = multinode(doc["table"])
    one_node = efficiency.on_one_node(doc)  # the model's machine is one node of ranks: its measured points
    if target is not None and target < 1:
        raise BadInput(f"report: --target {target}: a size is >= 1 rank")
    goal = target if target is not None else (doc["study"].get("report") or {}).get("target")
    pred, why_not = prediction(one_node, ar_path if ar is not None else None, (goal,) if goal else ())
    valid = summary.validation()
    top = summary.build(doc, pred, samples, epochs, target, valid)
    images: dict[str, tuple[bytes, str]] = {
        "summary.png": (plots.plot_summary(doc, pred, top),
                        "Throughput and efficiency against size: measured, the model's projection, the ideal line"),
        "throughput.png": (plots.plot_throughput(doc), "Throughput against ranks, with the ideal line"),
        "efficiency.png": (plots.plot_efficiency(doc), "Efficiency against ranks, with the no-communication baseline"),
        "breakdown.png": (plots.plot_breakdown(doc), "Step time breakdown per size and backend"),
    }
    if ar is not None:
        images["allreduce.png"] = (plots.plot_allreduce(ar), "Allreduce bus bandwidth against message size per backend")
    if pred is not None:
        images["prediction.png"] = (plots.plot_prediction(one_node, pred),
                                    f"Measured points and the model's prediction to {pred['rows'][-1]['size']} ranks")
    written = []
    for name, (png, _) in images.items():
        (study_dir / name).write_bytes(png)
        written.append(study_dir / name)
    points_csv = _csv(doc["table"], _with_nodes(POINT_COLUMNS, multi))
    runs_csv = _csv(_run_rows(doc), _with_nodes(RUN_COLUMNS, multi, ("nodes",)))
    (study_dir / "points.csv").write_text(points_csv)
    (study_dir / "runs.csv").write_text(runs_csv)
    written += [study_dir / "points.csv", study_dir / "runs.csv"]
    cross = efficiency.crossing(doc["table"], BASELINE)
    crossing_csv = _csv(cross, CROSSING_COLUMNS)
    if cross:
        (study_dir / "crossing.csv").write_text(crossing_csv)
        written.append(study_dir / "crossing.csv")
    if pred is not None:
        (study_dir / "prediction.json").write_text(json.dumps(pred, indent=2) + "\n")
        written.append(study_dir / "prediction.json")

    # the raw numbers: the page carries the CSV files and the study (the prediction is a link only)
    files = [File("points.csv", points_csv, "text/csv"), File("runs.csv", runs_csv, "text/csv"),
             File("study.json", json.dumps(doc, indent=2), "application/json"),
             *([File("crossing.csv", crossing_csv, "text/csv")] if cross else []),
             *([File("prediction.json")] if pred is not None else [])]
    page = sections(doc, ar, pred, why_not, top, valid, {name: caption for name, (_, caption) in images.items()},
                    files)
    (study_dir / "report.md").write_text(document.markdown(page))
    written.append(study_dir / "report.md")
    (study_dir / "report.html").write_text(document.html(page, {name: png for name, (png, _) in images.items()}))
    written.append(study_dir / "report.html")
    return written
