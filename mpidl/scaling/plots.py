"""The report's figures: each a function of the study's JSON (and the model's rows) returning PNG
bytes, drawn with matplotlib's Agg backend, figures closed once written.

    plot_summary(doc, pred, first_screen)   summary.png: throughput and efficiency, measured and the model
    plot_throughput(doc), plot_efficiency(doc), plot_breakdown(doc), plot_allreduce(ar),
    plot_prediction(doc, pred)

The names of backends and placements (label_of, backends, multinode, nodes_text) are the tables' too.
"""
from __future__ import annotations

import io
from typing import Optional

from mpidl.scaling import efficiency, model
from mpidl.scaling.efficiency import BASELINE
from mpidl.scaling.summary import unit_of

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


def label_of(b: str) -> str:
    return LABEL.get(b, b)


def backends(table: list[dict]) -> list[str]:
    names = sorted({r["backend"] for r in table}, key=lambda b: (b == BASELINE, b))
    return names


def _series(table: list[dict], backend: str, key: str, nodes: int = 1) -> tuple[list[int], list[float], list[bool]]:
    rows = sorted((r for r in table if r["backend"] == backend and r.get("nodes", 1) == nodes
                   and r.get(key) is not None), key=lambda r: r["size"])
    return [r["size"] for r in rows], [r[key] for r in rows], [r["oversubscribed"] for r in rows]


def multinode(table: list[dict]) -> bool:
    """Some size ran on more than one node: rows and series then say their placement."""
    return any(r.get("nodes", 1) > 1 for r in table)


def _lines(table: list[dict]) -> list[tuple[str, int]]:
    """The plotted series, (backend, node count), the baseline last."""
    return sorted({(r["backend"], r.get("nodes", 1)) for r in table}, key=lambda bn: (bn[0] == BASELINE, *bn))


def nodes_text(n: int) -> str:
    return f"{n} node{'s' if n > 1 else ''}"


def _line_label(b: str, n: int, multi: bool) -> str:
    return f"{label_of(b)}, {nodes_text(n)}" if multi else label_of(b)


def _style(b: str, n: int) -> tuple[str, str]:
    """(marker, line style): one node as always; more nodes dash-dotted (the baseline dotted)."""
    if n == 1:
        return ("s", "--") if b == BASELINE else ("o", "-")
    return ("D", ":") if b == BASELINE else ("^v<>"[(n - 2) % 4], "-.")


def _dodge(xs: list[int], nodes: int) -> list[float]:
    """x positions of an n-node series nudged right, so points at one size on several placements
    stay apart (one node: where they are)."""
    return [x * 2 ** (0.04 * (nodes - 1)) for x in xs]


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
    multi = multinode(table)
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
                label=f"ideal: p × {label_of(ref['backend'])} at 1 rank")
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
    multi = multinode(table)
    for ax, key, title in ((a1, "efficiency", "E(p) = X(p) / (p·X(1)), each backend's own 1 rank"),
                           (a2, "efficiency_vs_lone_rank", "E*(p) = X(p) / (p·X₀(1)) and the machine's limit L(p)")):
        _shade_oversubscribed(ax, table)
        for b, n in _lines(table):
            marker, ls = _style(b, n)
            if b == BASELINE and key == "efficiency_vs_lone_rank":
                xs, ys, _ = _series(table, b, "machine_limit", n)
                ax.plot(_dodge(xs, n), ys, marker + ls, color=COLORS[b], lw=2.5,
                        label="L(p): no-comm baseline (machine limit)" + (f", {nodes_text(n)}" if multi else ""))
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
    multi = multinode(table)
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
            ticklabels.append(f"{label_of(b)}\np={p}" + (f"\n{nodes_text(n)}" if multi else "")
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
    _by_message_size(a1, "busbw (GB/s) = algbw · 2(n−1)/n", "allreduce bus bandwidth (median over repeats)")
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
    _by_message_size(a2, "busbw ratio", "Horovod busbw / raw MPI busbw (medians of paired repeats)")
    return _png(fig)


def _by_message_size(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


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
        for b in backends(table):
            src = "efficiency" if key == "efficiency" else "throughput"
            xs, ys, over = _series(table, b, src if b != BASELINE or key != "efficiency" else "machine_limit")
            ax.scatter([x for x, o in zip(xs, over) if not o], [y for y, o in zip(ys, over) if not o], s=40,
                       color=COLORS.get(b), zorder=3, label=f"measured {label_of(b)}")
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
                        label=f"{f['law'].capitalize()} fit to {label_of(b)} (s = {f['serial_fraction']:.3g})")
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


def plot_summary(doc: dict, pred: Optional[dict], s: dict) -> bytes:
    """The headline plot: throughput with the ideal line and the model's projection; efficiency, measured
    and predicted, with the flag line."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.0))
    rows = pred["rows"] if pred else []
    upto = max([c["size"] for c in s["cost"]] + [s["target"] or 0, 2])
    mrows = [r for r in rows if r["size"] <= upto]
    base1 = next((r for r in doc["table"] if r["backend"] == BASELINE and r["size"] == 1), None) or \
        next((r for r in doc["table"] if r["size"] == 1), None)
    xs = sorted({r["size"] for r in mrows} | {m["size"] for m in s["measured"]} | {1})
    if base1:
        a1.plot(xs, [base1["throughput"] * p for p in xs], ":", color="black", lw=1, label="ideal: p × one rank")
    if mrows:
        a1.plot([r["size"] for r in mrows], [r["predicted"]["throughput"] for r in mrows], "-", color="#1f77b4",
                lw=1.6, label="model")
        a2.plot([r["size"] for r in mrows], [r["predicted"]["efficiency"] for r in mrows], "-", color="#1f77b4",
                lw=1.6, label="model")
    for nodes in sorted({m["nodes"] for m in s["measured"]}):
        ms = [m for m in s["measured"] if m["nodes"] == nodes]
        lab = f"measured ({s['backend']}" + (f", {nodes} nodes)" if nodes > 1 else ")")
        mk = "o" if nodes == 1 else "^"
        a1.scatter([m["size"] for m in ms], [m["throughput"] for m in ms], color="#d62728", marker=mk, zorder=3,
                   label=lab)
        a2.scatter([m["size"] for m in ms], [m["efficiency"] for m in ms], color="#d62728", marker=mk, zorder=3,
                   label=lab)
    if s["target"]:
        for ax in (a1, a2):
            ax.axvline(s["target"], color="#888888", ls="--", lw=1)
    a2.axhline(s["flag_below"], color="#cc0000", ls=":", lw=1, label=f"E = {s['flag_below']:g}")
    ticks = sorted({r["size"] for r in mrows} | {m["size"] for m in s["measured"]} | {1})
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(ticks) / 1.4, max(ticks) * 1.4)  # also where an axis holds no point (no efficiency)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:,}" for t in ticks], fontsize=7, rotation=45 if len(ticks) > 8 else 0)
        ax.set_xlabel(f"{unit_of(doc)}s")
        ax.grid(True, alpha=0.3, which="both")
    plotted = ([base1["throughput"]] if base1 else []) + [r["predicted"]["throughput"] for r in mrows] + \
        [m["throughput"] for m in s["measured"]]
    if any(t and t > 0 for t in plotted):
        a1.set_yscale("log")
    else:  # no rank count measured alone or with the best backend (e.g. one size on 1 and 2 nodes)
        a1.text(0.5, 0.5, "no throughput to plot", ha="center", va="center", transform=a1.transAxes, fontsize=8)
    a1.set_ylabel("samples/s")
    a2.set_ylabel("efficiency E")
    a2.set_ylim(0, 1.1)
    if a1.get_legend_handles_labels()[0]:
        a1.legend(fontsize=7)
    a2.legend(fontsize=7, loc="lower left")
    a1.set_title("throughput", fontsize=9)
    a2.set_title("efficiency", fontsize=9)
    fig.tight_layout()
    return _png(fig)

