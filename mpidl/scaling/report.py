"""`mpidl report STUDY_DIR`: plots, CSV, Markdown and a self-contained HTML page of a study.

Writes into STUDY_DIR: throughput.png, efficiency.png, breakdown.png, allreduce.png (when an
allreduce measurement is there), prediction.png, points.csv, runs.csv, report.md and
report.html (the same content, images embedded, nothing fetched from elsewhere).

A study that placed sizes on several node counts labels its rows and plot series by placement,
adds a "crossing nodes" section (and crossing.csv), and gives the model its one-node points.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
from pathlib import Path
from typing import Optional

from mpidl.errors import BadInput
from mpidl.scaling import efficiency, model, summary
from mpidl.scaling.efficiency import BASELINE

COLORS = {"horovod": "#1f77b4", "mpi": "#2ca02c", "ddp": "#d62728", BASELINE: "#555555", "torch-gloo": "#d62728",
          "torch-nccl": "#d62728", "horovod-stock": "#9467bd"}
SPARE = ["#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]


def _color(name: str, others: list[str]) -> str:
    """A fixed colour for the known backends, a distinct spare one for any other variant."""
    if name in COLORS:
        return COLORS[name]
    extra = sorted(n for n in others if n not in COLORS)
    return SPARE[extra.index(name) % len(SPARE)]
BUCKET_COLORS = {"data": "#9ecae1", "compute": "#3182bd", "sync": "#e6550d", "optimizer": "#31a354"}
LABEL = {BASELINE: "no-comm baseline"}

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


def _label(b: str) -> str:
    return LABEL.get(b, b)


def _backends(table: list[dict]) -> list[str]:
    names = sorted({r["backend"] for r in table}, key=lambda b: (b == BASELINE, b))
    return names


def _series(table: list[dict], backend: str, key: str, nodes: int = 1) -> tuple[list[int], list[float], list[bool]]:
    rows = sorted((r for r in table if r["backend"] == backend and r.get("nodes", 1) == nodes
                   and r.get(key) is not None), key=lambda r: r["size"])
    return [r["size"] for r in rows], [r[key] for r in rows], [r["oversubscribed"] for r in rows]


def _multinode(table: list[dict]) -> bool:
    """Some size ran on more than one node: rows and series then say their placement."""
    return any(r.get("nodes", 1) > 1 for r in table)


def _lines(table: list[dict]) -> list[tuple[str, int]]:
    """The plotted series, (backend, node count), the baseline last."""
    return sorted({(r["backend"], r.get("nodes", 1)) for r in table}, key=lambda bn: (bn[0] == BASELINE, *bn))


def _nodes_text(n: int) -> str:
    return f"{n} node{'s' if n > 1 else ''}"


def _line_label(b: str, n: int, multi: bool) -> str:
    return f"{_label(b)}, {_nodes_text(n)}" if multi else _label(b)


def _style(b: str, n: int) -> tuple[str, str]:
    """(marker, line style): one node as always; more nodes dash-dotted (the baseline dotted)."""
    if n == 1:
        return ("s", "--") if b == BASELINE else ("o", "-")
    return ("D", ":") if b == BASELINE else ("^v<>"[(n - 2) % 4], "-.")


def _on(nodes: int, multi: bool) -> str:
    """' on n nodes' where the study has several placements, else nothing."""
    return f" on {_nodes_text(nodes)}" if multi else ""


def _dodge(xs: list[int], nodes: int) -> list[float]:
    """x positions of an n-node series nudged right, so points at one size on several placements
    stay apart (one node: where they are)."""
    return [x * 2 ** (0.04 * (nodes - 1)) for x in xs]


def _where(size: int, nodes: int, multi: bool) -> str:
    return f"{size}{_on(nodes, multi)}"


def _png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open one alive)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ranks_axis(ax, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    lim = ax.dataLim
    if not 0 < lim.x0 <= lim.x1 < float("inf"):  # nothing drawn (no 1-rank point to compare with)
        ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("ranks")
    ax.grid(True, alpha=0.3)


def _shade_oversubscribed(ax, table: list[dict]) -> None:
    over = sorted({r["size"] for r in table if r["oversubscribed"]})
    if over:
        ax.axvspan(over[0] / 2**0.5, over[-1] * 2**0.5, color="#f4cccc", alpha=0.4, lw=0,
                   label="oversubscribed (more ranks than cores)")


def plot_throughput(doc: dict) -> bytes:
    plt = _plt()
    table = doc["table"]
    sizes = sorted({r["size"] for r in table})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _shade_oversubscribed(ax, table)
    multi = _multinode(table)
    for b, n in _lines(table):
        xs, ys, _ = _series(table, b, "throughput", n)
        rows = sorted((r for r in table if r["backend"] == b and r.get("nodes", 1) == n), key=lambda r: r["size"])
        lo = [r["throughput"] - r["throughput_min"] for r in rows]
        hi = [r["throughput_max"] - r["throughput"] for r in rows]
        marker, ls = _style(b, n)
        ax.errorbar(_dodge(xs, n), ys, yerr=[lo, hi], marker="o" if n == 1 else marker, capsize=3, color=COLORS.get(b),
                    label=_line_label(b, n, multi), ls=ls)
    base1 = next((r for r in table if r["backend"] == BASELINE and r["size"] == 1), None)
    ref = base1 or next((r for r in table if r["size"] == 1), None)
    if ref:
        per = ref["throughput"] if doc["study"]["mode"] == "weak" else ref["throughput"]
        ax.plot(sizes, [per * p for p in sizes], ":", color="black",
                label=f"ideal: p × {_label(ref['backend'])} at 1 rank")
    _ranks_axis(ax, sizes)
    ax.set_ylabel("samples/s (all ranks)")
    ax.set_title(f"{doc['study']['name']}: throughput ({doc['study']['mode']} scaling; median, min–max bars)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_efficiency(doc: dict) -> bytes:
    plt = _plt()
    table = doc["table"]
    sizes = sorted({r["size"] for r in table})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    multi = _multinode(table)
    for ax, key, title in ((a1, "efficiency", "E(p) = X(p) / (p·X(1)), each backend's own 1 rank"),
                           (a2, "efficiency_vs_lone_rank", "E*(p) = X(p) / (p·X₀(1)) and the machine's limit L(p)")):
        _shade_oversubscribed(ax, table)
        for b, n in _lines(table):
            marker, ls = _style(b, n)
            if b == BASELINE and key == "efficiency_vs_lone_rank":
                xs, ys, _ = _series(table, b, "machine_limit", n)
                ax.plot(_dodge(xs, n), ys, marker + ls, color=COLORS[b], lw=2.5,
                        label="L(p): no-comm baseline (machine limit)" + (f", {_nodes_text(n)}" if multi else ""))
                continue
            xs, ys, _ = _series(table, b, key, n)
            ax.plot(_dodge(xs, n), ys, marker + ls, color=COLORS.get(b), label=_line_label(b, n, multi))
        ax.axhline(1.0, color="black", ls=":", lw=1)
        ax.axhline(doc["study"].get("flag_below", 0.8), color="#cc0000", ls=":", lw=1,
                   label=f"flag below {doc['study'].get('flag_below', 0.8)}")
        _ranks_axis(ax, sizes)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    a1.set_ylabel("efficiency")
    top = max([1.0] + [r.get(k) or 0 for r in table for k in ("efficiency", "efficiency_vs_lone_rank")])
    a1.set_ylim(0, 1.1 * top)
    return _png(fig)


def plot_breakdown(doc: dict) -> bytes:
    plt = _plt()
    table = doc["table"]
    sizes = sorted({r["size"] for r in table})
    lines = _lines(table)
    multi = _multinode(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sizes) * len(lines)), 4.5))
    width = 0.8 / len(lines)
    labels_done = set()
    ticks, ticklabels = [], []
    for i, p in enumerate(sizes):
        for j, (b, n) in enumerate(lines):
            r = next((r for r in table if r["backend"] == b and r["size"] == p and r.get("nodes", 1) == n), None)
            if r is None:
                continue
            x = i + (j - (len(lines) - 1) / 2) * width
            bottom = 0.0
            for k in efficiency.BUCKETS:
                v = 1e3 * (r.get(k) or 0.0)
                ax.bar(x, v, width * 0.9, bottom=bottom, color=BUCKET_COLORS[k],
                       label=k if k not in labels_done else None, hatch="//" if r["oversubscribed"] else None,
                       edgecolor="white")
                labels_done.add(k)
                bottom += v
            ax.plot([x - width * 0.45, x + width * 0.45], [1e3 * r["step_time"]] * 2, color="black", lw=1)
            ticks.append(x)
            ticklabels.append(f"{_label(b)}\np={p}" + (f"\n{_nodes_text(n)}" if multi else "")
                              + (" (over)" if r["oversubscribed"] else ""))
    ax.set_xticks(ticks)
    ax.set_xticklabels(ticklabels, fontsize=7)
    ax.set_ylabel("ms per step (medians; black line: measured step time)")
    ax.set_title(f"where a step's time goes ({doc['points'][0]['breakdown_source'] if doc['points'] else ''})",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def _placement(row: dict) -> tuple[int, int]:
    """(nodes, ranks per node) of a bench_allreduce row; rows from before placements: one node."""
    return row.get("nodes", 1), row.get("per_node", row["ranks"])


def _placement_label(nodes: int, per_node: int) -> str:
    return f"{per_node} ranks" if nodes == 1 else f"{nodes} nodes × {per_node}"


def plot_allreduce(ar: dict) -> bytes:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", "-.", ":"]
    places = sorted({_placement(s) for s in ar["summary"]}, key=lambda p: (p[0] > 1, p[0] * p[1], p))
    names = sorted({s["backend"] for s in ar["summary"]})
    for b in names:
        for i, pl in enumerate(places):
            pts = sorted((s for s in ar["summary"] if s["backend"] == b and _placement(s) == pl),
                         key=lambda s: s["bytes"])
            if pts:
                a1.plot([s["bytes"] for s in pts], [s["busbw_GBps"] for s in pts], styles[i % 4], marker=".",
                        color=_color(b, names), label=f"{b}, {_placement_label(*pl)}")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("message size (bytes)")
    a1.set_ylabel("busbw (GB/s) = algbw · 2(n−1)/n")
    a1.set_title("allreduce bus bandwidth (median over repeats)", fontsize=9)
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=7)
    variants = sorted({r["variant"] for r in ar.get("ratios", [])})
    for i, pl in enumerate(places):
        for j, v in enumerate(variants):
            pts = sorted((r for r in ar["ratios"] if _placement(r) == pl and r["variant"] == v),
                         key=lambda r: r["bytes"])
            if pts:
                a2.plot([r["bytes"] for r in pts], [r["ratio"] for r in pts], styles[i % 4], marker="os^vD"[j % 5],
                        color=_color(v, names), label=f"{v} / raw MPI, {_placement_label(*pl)}")
    a2.axhline(0.9, color="#cc0000", ls=":", label="goal 0.9 at ≥ 16 MiB")
    a2.axvline(16 * 2**20, color="gray", ls=":")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("message size (bytes)")
    a2.set_ylabel("busbw ratio")
    a2.set_title("Horovod busbw / raw MPI busbw (medians of paired repeats)", fontsize=9)
    a2.grid(True, alpha=0.3)
    a2.legend(fontsize=7)
    return _png(fig)


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
    fits = {}
    law = "amdahl" if doc["study"]["mode"] == "strong" else "gustafson"
    fit = model.fit_amdahl if law == "amdahl" else model.fit_gustafson
    for b in _backends(doc["table"]):
        pts = [r for r in doc["table"] if r["backend"] == b and r.get("speedup") and not r["oversubscribed"]]
        if len([r for r in pts if r["size"] > 1]) < 2:  # one measured size above 1 is not a fit: left out
            continue
        s = fit([r["size"] for r in pts], [r["speedup"] for r in pts])
        if s is not None:
            fits[b] = {"law": law, "serial_fraction": s, "points": len(pts)}
    return {"assumed": assumed, "rows": rows, "fits": fits}, ""


def plot_prediction(doc: dict, pred: dict) -> bytes:
    plt = _plt()
    rows = pred["rows"]
    sizes = [r["size"] for r in rows]
    table = doc["table"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for key, ax in (("throughput", a1), ("efficiency", a2)):
        for variant, style, label in (("hierarchical_overlap", "-", "model: hierarchical, overlap ω"),
                                      ("ring_overlap", "--", "model: ring, overlap ω"),
                                      ("ring_no_overlap", ":", "model: ring, no overlap")):
            ax.plot(sizes, [r[variant][key] for r in rows], style, color="black", lw=1.3, label=label)
        for b in _backends(table):
            src = "efficiency" if key == "efficiency" else "throughput"
            xs, ys, over = _series(table, b, src if b != BASELINE or key != "efficiency" else "machine_limit")
            ax.scatter([x for x, o in zip(xs, over) if not o], [y for y, o in zip(ys, over) if not o], s=40,
                       color=COLORS.get(b), zorder=3, label=f"measured {_label(b)}")
            if any(over):
                ax.scatter([x for x, o in zip(xs, over) if o], [y for y, o in zip(ys, over) if o], s=40,
                           facecolors="none", edgecolors=COLORS.get(b), zorder=3)
        best = _best_fit(pred["fits"])
        if best:
            b, f = best
            x1 = next((r["throughput"] for r in table if r["backend"] == b and r["size"] == 1), None)
            law = model.amdahl if f["law"] == "amdahl" else model.gustafson
            if x1:
                vals = [law(f["serial_fraction"], p) for p in sizes]
                ys = [x1 * v for v in vals] if key == "throughput" else [v / p for v, p in zip(vals, sizes)]
                ax.plot(sizes, ys, "-.", color=COLORS.get(b), alpha=0.7,
                        label=f"{f['law'].capitalize()} fit to {_label(b)} (s = {f['serial_fraction']:.3g})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks (GPUs)")
        ax.grid(True, alpha=0.3, which="both")
    a1.set_yscale("log")
    a1.set_ylabel("samples/s")
    a2.set_ylabel("efficiency E(p)")
    a2.set_ylim(0, 1.1)
    a = pred["assumed"]
    fig.suptitle(f"measured points and the model to {sizes[-1]} ranks: {a['ranks_per_node']} ranks/node, "
                 f"intra {a['intra']['name']}, inter {a['inter']['name']}", fontsize=9)
    a1.legend(fontsize=7)
    return _png(fig)


def _best_fit(fits: dict) -> Optional[tuple[str, dict]]:
    cands = [(b, f) for b, f in fits.items() if b != BASELINE]
    return min(cands, key=lambda bf: bf[1]["serial_fraction"]) if cands else None


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
    multi = _multinode(doc["table"])
    head = ["backend", "p", *(["nodes × ranks"] if multi else []), "samples/s (min–max)", "ms/step", "data",
            "compute", "sync", "opt", "S(p)", "E(p)", "E*(p)", "L(p)", "X/X₀", "comm share", "sync share", "KF"]
    body = []
    for r in doc["table"]:
        flags = (" ⚑" if r["flagged"] else "") + (" (oversubscribed)" if r["oversubscribed"] else "")
        n = r.get("nodes", 1)
        body.append([_label(r["backend"]), f"{r['size']}{flags}", *([f"{n} × {r['size'] // n}"] if multi else []),
                     f"{_fmt(r['throughput'])} ({_fmt(r['throughput_min'])}–{_fmt(r['throughput_max'])})",
                     _fmt(1e3 * r["step_time"]),
                     *[_fmt(1e3 * r[k]) if r.get(k) is not None else "–" for k in efficiency.BUCKETS],
                     _fmt(r.get("speedup")), _fmt(r.get("efficiency")), _fmt(r.get("efficiency_vs_lone_rank")),
                     _fmt(r.get("machine_limit")), _fmt(r.get("of_limit")), _fmt(r.get("comm_share")),
                     _fmt(r.get("sync_share")), _fmt(r.get("karp_flatt"))])
    return head, body


def _goals_view(doc: dict, ar: Optional[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["goal", "size", "measured", "target", "met"]
    multi = _multinode(doc["table"])
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
    body = [[_label(r["backend"]), str(r["size"]), f"{r['nodes']} × {r['ranks_per_node']}",
             _fmt(r["throughput_one_node"]), _fmt(r["throughput"]), _fmt(r["ratio"]), ms(r["step_time_one_node"]),
             ms(r["step_time"]), ms(r["sync_one_node"]), ms(r["sync"]), _fmt(r["comm_share_one_node"]),
             _fmt(r["comm_share"]), ms(r["exposed_one_node"]), ms(r["exposed"]), ms(r["crossing_cost"])]
            for r in rows]
    return head, body


def _crossing_lines(rows: list[dict]) -> list[str]:
    """Each crossing row in a sentence."""
    out = []
    for r in rows:
        head = (f"{_label(r['backend'])}: {r['size']} ranks on {_nodes_text(r['nodes'])} ({r['ranks_per_node']} each) "
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
                         "divides it)")] if _multinode(doc["table"]) else []),
            ("backends", ", ".join(s["backends"]) + (" + no-comm baseline" if s["baseline"] else "")),
            ("steps", f"{s['warmup_steps']} warm-up + {s['steps']} measured, windows of {s['window']}"),
            ("repetitions", f"{s['repetitions']} (interleaved: sizes up/down alternately, backends rotated)"),
            ("threads per rank", str(s["threads_per_rank"] or "unset")),
            ("breakdown from", doc["points"][0]["breakdown_source"] if doc["points"] else "–"),
            ("gradient parameters", _fmt((doc.get("model_inputs") or {}).get("grad_params")))]


def _notes(doc: dict, ar: Optional[dict]) -> list[str]:
    """What falls short, said plainly, from the numbers."""
    notes = []
    multi = _multinode(doc["table"])
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


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _kv_html(pairs: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs) \
        + "</table>"


def _kv_md(pairs: list[tuple[str, str]]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in pairs)


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:.8em;overflow:auto;
font-size:12px}.note{background:#fff4e5;border-left:4px solid #f0a020;padding:.4em .8em;margin:.4em 0}
h1{font-size:22px;margin:.2em 0}.machine{margin:.2em 0;color:#555;font-size:13px}
#summary{border:1px solid #cfd8e3;background:#f7fafd;padding:.4em .9em;margin:.5em 0 1.5em}
.headline{font-size:15px;margin:.35em 0}.cols{display:flex;gap:1.2em;align-items:flex-start;flex-wrap:wrap}
#headline-plot{margin:.3em 0;flex:0 1 680px;min-width:0}#headline-plot img{width:100%;max-width:680px}
#headline-plot figcaption{font-size:12px;color:#555}.side{flex:1 1 300px;min-width:0;font-size:13px}
.side table{font-size:12px}.side td,.side th{padding:2px 5px}
.small{font-size:12px;color:#444}"""


APPENDIX = "Appendix: mpidl's own benchmark goals"
APPENDIX_INTRO = ("What mpidl holds itself to (its backends against DDP and against the no-communication baseline, "
                  "Horovod's busbw against raw MPI), as this study measured them: for mpidl's developers, not a "
                  "statement about the job.")

CROSSING_TITLE = "Crossing nodes: p ranks on n nodes against the same p on one node"
CROSSING_INTRO = ("The same ranks and cores, placed differently: on one node the ranks talk through shared memory, "
                  "across nodes over the network between them. The baseline sends nothing; its "
                  "ratio shows what the placement changes apart from communication.")


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

    multi = _multinode(doc["table"])
    one_node = efficiency.on_one_node(doc)  # the model's machine is one node of ranks: its measured points
    if target is not None and target < 1:
        raise BadInput(f"report: --target {target}: a size is >= 1 rank")
    goal = target if target is not None else (doc["study"].get("report") or {}).get("target")
    pred, why_not = prediction(one_node, ar_path if ar is not None else None, (goal,) if goal else ())
    valid = summary.validation()
    top = summary.build(doc, pred, samples, epochs, target, valid)
    unit = summary.unit_of(doc)
    images: dict[str, tuple[bytes, str]] = {
        "summary.png": (summary.plot(doc, pred, top, _png),
                        "Throughput and efficiency against size: measured, the model's projection, the ideal line"),
        "throughput.png": (plot_throughput(doc), "Throughput against ranks, with the ideal line"),
        "efficiency.png": (plot_efficiency(doc), "Efficiency against ranks, with the no-communication baseline"),
        "breakdown.png": (plot_breakdown(doc), "Step time breakdown per size and backend"),
    }
    if ar is not None:
        images["allreduce.png"] = (plot_allreduce(ar), "Allreduce bus bandwidth against message size per backend")
    if pred is not None:
        images["prediction.png"] = (plot_prediction(one_node, pred),
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

    s = doc["study"]
    title = f"Scaling study {s['name']}: {s['mode']} scaling of " + (
        doc["job_file"] if "command" in doc["job"] else doc["job"]["model"]["name"])
    ph, pb = _points_view(doc)
    gh, gb = _goals_view(doc, ar)
    notes = _notes(doc, ar)
    formulas = [(name, f, why) for name, f, why in efficiency.FORMULAS]
    pred_intro = ""
    if pred is not None:
        a = pred["assumed"]
        pred_intro = (f"Inputs: compute {_fmt(1e3 * a['compute_s'])} ms per step ({a['compute_source']}); "
                      f"{_fmt(a['grad_params'])} gradient parameters × {a['bytes_per_param']} B = "
                      f"{a['grad_bytes'] / 2**20:.2f} MiB per step; {a['ranks_per_node']} ranks per node; intra "
                      f"{a['intra']['name']} (α {a['intra']['alpha'] * 1e6:.2f} µs, "
                      f"{a['intra']['bandwidth_GBps']:.2f} GB/s); inter {a['inter']['name']} "
                      f"(α {a['inter']['alpha'] * 1e6:.2f} µs, {a['inter']['bandwidth_GBps']:.2f} GB/s per node); "
                      f"overlap ω = {a['overlap']:.2f}; buckets of {a['bucket_mb']} MiB; {a['library']} "
                      f"[{', '.join(a['algorithms'])}]; stragglers σ = {a['jitter_cv']:.3g} ({a['jitter_source']}); "
                      f"contention L = "
                      f"{ {k: round(v, 3) for k, v in (a['contention_limit'] or {}).items()} or 'none measured'}.")
        fits = "; ".join(f"{f['law'].capitalize()} fit of {_label(b)}: s = {f['serial_fraction']:.4g} "
                         f"({f['points']} points)" for b, f in pred["fits"].items())
        pred_intro += (" " + fits + ".") if fits else ""
        if multi:
            pred_intro += " The model and the fits take the one-node points; the others are under crossing nodes."
    ar_text = ""
    if ar is not None:
        fits = ar.get("fits", {})
        ar_text = "; ".join(f"{b} p={p}: α = {f['alpha_s'] * 1e6:.1f} µs, B = "
                            + (f"{f['bandwidth_GBps']:.2f} GB/s" if f["bandwidth_GBps"] else "unreadable (noise)")
                            for b, by in fits.items() for p, f in by.items())
        tuning = ar.get("horovod_settings")
        if tuning:
            ar_text += f". Horovod settings: {json.dumps(tuning)}"

    sent = top["sentences"]
    val_line = summary.validation_line(valid)
    cost_h, cost_b = summary.cost_view(top, unit)
    val_h, val_b = summary.validation_view(valid)
    rows_h, rows_b = summary.rows_view(valid)
    later = {k: v for k, v in images.items() if k != "summary.png"}

    # ------------------------------------------------ Markdown: the summary first, mpidl's own goals last
    md = [f"# {title}", "", f"Machine: {doc['environment'].get('cpu_model')}, {doc['environment'].get('cores')} cores"
          + (f", {doc['environment'].get('gpu')}" if doc['environment'].get('gpu') else "")
          + f"; commit {doc['environment'].get('commit')}.", ""]
    if not doc.get("complete"):
        md += ["**This study did not finish: the figures cover the runs done so far.**", ""]
    md += ["## Summary", "", f"**{sent['headline']}**", "", f"**{sent['cost']}**" if sent["cost"] else "", "",
           f"![{images['summary.png'][1]}](summary.png)", ""]
    if cost_b:
        md += [_md_table(cost_h, cost_b), ""]
    md += [val_line, ""]
    if val_b:
        md += [_md_table(val_h, val_b), ""]
    md += [sent["assumptions"], ""]
    md += ["## Points (medians over repetitions)", "", _md_table(ph, pb), "",
           "⚑: efficiency E* below the flag threshold. Times in ms.", ""]
    if cross:
        md += [f"## {CROSSING_TITLE}", "", CROSSING_INTRO, ""] + [f"- {line}" for line in _crossing_lines(cross)]
        md += ["", _md_table(*_crossing_view(cross)), ""]
        md += [f"- **{n}**: `{f}` — {w}" for n, f, w in efficiency.CROSSING_FORMULAS] + [""]
    for name, (_, caption) in later.items():
        md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    md += ["## Formulas", ""] + [f"- **{n}**: `{f}` — {w}" for n, f, w in formulas] + [""]
    md += ["## The model", "", pred_intro or f"No prediction: {why_not}", "", "```", model.FORMULAS, "```", ""]
    if pred is not None:
        md += [_md_table(*_prediction_view(pred)), ""]
    if rows_b:
        assert valid is not None  # rows_view gives rows only from a validation
        md += ["### The model against published results", "", val_line, "", _md_table(rows_h, rows_b), "",
               "Every input, with its source or the reasoning of its estimate: benchmarks/published/*.yaml; "
               "`mpidl scale predict --published benchmarks/published` prints each row's step and why a row "
               f"beyond ±{valid['bound']} points misses.", ""]
    if ar_text:
        md += ["## Allreduce fits (bench_allreduce)", "", ar_text, ""]
    md += ["## Settings", "", _kv_md(_settings(doc)), "", "## Environment", "", _kv_md(_env_view(doc)), "",
           "Raw numbers: [points.csv](points.csv), [runs.csv](runs.csv), [study.json](study.json)"
           + (", [crossing.csv](crossing.csv)" if cross else "")
           + (", [prediction.json](prediction.json)" if pred else "") + ".", ""]
    md += [f"## {APPENDIX}", "", APPENDIX_INTRO, "", "### Goals, as measured", "",
           _md_table(gh, gb) if gb else "No goal applies to this study.", ""]
    md += ["### What falls short, and why", ""] + [f"- {n}" for n in notes] + ([""] if notes else ["Nothing.", ""])
    (study_dir / "report.md").write_text("\n".join(md))
    written.append(study_dir / "report.md")

    # ------------------------------------------------ HTML (self-contained)
    def img(name: str, caption: str, ident: str = "") -> str:
        b64 = base64.b64encode(images[name][0]).decode()
        return f'<figure{f" id={chr(39)}{ident}{chr(39)}" if ident else ""}><img alt="{html.escape(caption)}" ' \
               f'src="data:image/png;base64,{b64}"><figcaption>{html.escape(caption)}</figcaption></figure>'

    def download(name: str, text: str, mime: str) -> str:
        b64 = base64.b64encode(text.encode()).decode()
        return f'<a download="{name}" href="data:{mime};base64,{b64}">{name}</a>'

    h = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
         f"<p class='machine'>{html.escape(md[2])}</p>"]
    if not doc.get("complete"):
        h.append("<p class='note'>This study did not finish: the figures cover the runs done so far.</p>")
    h += ["<section id='summary'>", f"<p id='headline' class='headline'>{html.escape(sent['headline'])}</p>",
          f"<p id='cost' class='headline'>{html.escape(sent['cost'])}</p>" if sent["cost"] else "",
          "<div class='cols'>", img("summary.png", images["summary.png"][1], "headline-plot"), "<div class='side'>",
          _html_table(cost_h, cost_b) if cost_b else "",
          f"<p id='validation'>{html.escape(val_line)}</p>", _html_table(val_h, val_b) if val_b else "",
          "</div></div>", f"<p class='small'>{html.escape(sent['assumptions'])}</p>", "</section>"]
    h += ["<h2>Points (medians over repetitions)</h2>", _html_table(ph, pb),
          "<p>⚑: efficiency E* below the flag threshold. Times in ms.</p>"]
    if cross:
        h += [f"<h2>{html.escape(CROSSING_TITLE)}</h2>", f"<p>{html.escape(CROSSING_INTRO)}</p>", "<ul>"]
        h += [f"<li>{html.escape(line)}</li>" for line in _crossing_lines(cross)] + ["</ul>"]
        h += [_html_table(*_crossing_view(cross)),
              _html_table(["", "formula", "meaning"], [list(f) for f in efficiency.CROSSING_FORMULAS])]
    h += [img(name, caption) for name, (_, caption) in later.items()]
    h += ["<h2>Formulas</h2>", _html_table(["", "formula", "meaning"], [list(f) for f in formulas])]
    h += ["<h2>The model</h2>", f"<p>{html.escape(pred_intro or 'No prediction: ' + why_not)}</p>",
          f"<pre>{html.escape(model.FORMULAS)}</pre>"]
    if pred is not None:
        h.append(_html_table(*_prediction_view(pred)))
    if rows_b:
        assert valid is not None  # rows_view gives rows only from a validation
        h += ["<h3>The model against published results</h3>", f"<p>{html.escape(val_line)}</p>",
              _html_table(rows_h, rows_b),
              "<p>Every input, with its source or the reasoning of its estimate: benchmarks/published/*.yaml; "
              "<code>mpidl scale predict --published benchmarks/published</code> prints each row's step and why a "
              f"row beyond ±{valid['bound']} points misses.</p>"]
    if ar_text:
        h += ["<h2>Allreduce fits (bench_allreduce)</h2>", f"<p>{html.escape(ar_text)}</p>"]
    h += ["<h2>Settings</h2>", _kv_html(_settings(doc)), "<h2>Environment</h2>", _kv_html(_env_view(doc)),
          "<h2>Raw numbers</h2><p>", download("points.csv", points_csv, "text/csv"), " · ",
          download("runs.csv", runs_csv, "text/csv"), " · ",
          *([download("crossing.csv", crossing_csv, "text/csv"), " · "] if cross else []),
          download("study.json", json.dumps(doc, indent=2), "application/json"), "</p>",
          f"<details><summary>points.csv</summary><pre>{html.escape(points_csv)}</pre></details>",
          f"<details><summary>runs.csv</summary><pre>{html.escape(runs_csv)}</pre></details>"]
    h += [f"<h2 id='appendix'>{html.escape(APPENDIX)}</h2>", f"<p>{html.escape(APPENDIX_INTRO)}</p>",
          "<h3>Goals, as measured</h3>", _html_table(gh, gb) if gb else "<p>No goal applies to this study.</p>",
          "<h3>What falls short, and why</h3>"]
    h += [f"<p class='note'>{html.escape(n)}</p>" for n in notes] or ["<p>Nothing.</p>"]
    h += ["</body></html>"]
    (study_dir / "report.html").write_text("\n".join(h))
    written.append(study_dir / "report.html")
    return written
