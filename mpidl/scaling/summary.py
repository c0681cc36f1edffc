"""The first screen of a scaling report: how far the job scales, what it costs, and how far to trust
the model that says so.

  - the headline: the largest size at which the model (from the measured points) keeps the
    efficiency at or above the study's flag_below, the measured efficiency at each size, and the
    projection to a target size;
  - the cost of a stated amount of work at each size: wall time = samples / X(p),
    node-hours = wall time × nodes, rank-hours (GPU-hours on GPU nodes) = wall time × p, X(p) the
    measured throughput where measured, else the model's;
  - the model held against published results (benchmarks/published): its error per paper.
"""
from __future__ import annotations

from typing import Optional

from mpidl.errors import BadInput
from mpidl.scaling import model
from mpidl.scaling.efficiency import BASELINE


def best_backend(table: list[dict]) -> Optional[str]:
    """The backend the summary speaks for: the highest E* at the largest one-node size the cores hold
    (as the goals pick it), any backend but the baseline."""
    cands = sorted({r["backend"] for r in table if r["backend"] != BASELINE})
    if not cands:
        return None
    one = [r for r in table if r.get("nodes", 1) == 1 and r["backend"] in cands]
    fair = [r["size"] for r in one if not r["oversubscribed"]] or [r["size"] for r in one] or [1]
    top = max(fair)
    return max(cands, key=lambda b: next((r.get("efficiency_vs_lone_rank") or r.get("efficiency") or 0.0
                                          for r in one if r["backend"] == b and r["size"] == top), 0.0))


def samples_per_epoch(doc: dict) -> tuple[Optional[int], str]:
    """Samples in one epoch of the job: the study's report.samples_per_epoch, else its synthetic
    rows less the validation share; else unknown."""
    rep = (doc["study"].get("report") or {})
    if rep.get("samples_per_epoch"):
        return int(rep["samples_per_epoch"]), "report.samples_per_epoch"
    data = (doc.get("job") or {}).get("data") or {}
    synth = data.get("synth") or {}
    if synth.get("rows") and data.get("val_files") is None:
        rows = synth["rows"] - int(round(synth["rows"] * (data.get("val_fraction") or 0.0)))
        return rows, "the job's synthetic rows less validation"
    return None, ""


def work(doc: dict, samples: Optional[float], epochs: Optional[float]) -> tuple[float, str]:
    """(samples to train, how that was stated) from options, else study keys, else one epoch, else 1e6."""
    rep = doc["study"].get("report") or {}
    if samples is not None and epochs is not None:
        raise BadInput("report: give --samples or --epochs, not both")
    samples = samples if samples is not None else (None if epochs is not None else rep.get("samples"))
    epochs = epochs if epochs is not None else (None if samples is not None else rep.get("epochs"))
    per, where = samples_per_epoch(doc)
    if samples is not None:
        return float(samples), f"{_count(samples)} samples"
    if epochs is not None:
        if per is None:
            raise BadInput("report: --epochs needs the samples in an epoch: set report.samples_per_epoch in the "
                           "study, or give --samples")
        return epochs * per, f"{epochs:g} epoch{'s' if epochs != 1 else ''} of {_count(per)} samples ({where})"
    if per is not None:
        return float(per), f"one epoch of {_count(per)} samples ({where}; --epochs or --samples to change it)"
    return 1e6, "a million samples (no epoch size known; --samples or --epochs to state the work)"


def _n(count: int, unit: str) -> str:
    return f"{count:,} {unit}{'s' if count != 1 else ''}"


def _count(n: float) -> str:
    return f"{n:,.0f}" if n < 1e7 else f"{n:.3g}"


def hours(h: float) -> str:
    if h < 10 / 3600:
        return f"{h * 3600:.1f} s"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    return f"{h:.1f} h" if h < 100 else f"{h:,.0f} h"


def build(doc: dict, pred: Optional[dict], samples: Optional[float] = None, epochs: Optional[float] = None,
          target: Optional[int] = None, validation: Optional[dict] = None) -> dict:
    """Everything the first screen says, as numbers and sentences (Markdown and HTML render it alike)."""
    table = doc["table"]
    best = best_backend(table)
    flag = doc["study"].get("flag_below", 0.8)
    target = target if target is not None else (doc["study"].get("report") or {}).get("target")
    amount, what = work(doc, samples, epochs)
    measured = sorted((r for r in table if r["backend"] == best), key=lambda r: (r["size"], r.get("nodes", 1))) \
        if best else []
    rows = pred["rows"] if pred else []
    g = pred["assumed"]["ranks_per_node"] if pred else 1
    eff = lambda r: r.get("efficiency_vs_lone_rank", r.get("efficiency"))  # noqa: E731

    out: dict = {"backend": best, "flag_below": flag, "work": what, "samples": amount, "target": target}
    # how far it scales, by the model
    ok = [r for r in rows if r["predicted"]["efficiency"] >= flag and r["size"] > 1]
    reach = max(ok, key=lambda r: r["size"]) if ok else None
    out["reach"] = {"size": reach["size"], "nodes": reach["nodes"], "efficiency": reach["predicted"]["efficiency"],
                    "throughput": reach["predicted"]["throughput"]} if reach else None
    out["measured"] = [{"size": r["size"], "nodes": r.get("nodes", 1), "efficiency": eff(r),
                        "throughput": r["throughput"], "oversubscribed": r["oversubscribed"]} for r in measured]
    if target and pred:
        try:
            nodes, _ = model.layout(target, g)
        except BadInput as e:
            raise BadInput(f"report: --target {target}: {e}") from None
        t = next((r for r in rows if r["size"] == target), None)
        out["target_row"] = {"size": target, "nodes": nodes, "efficiency": t["predicted"]["efficiency"],
                             "throughput": t["predicted"]["throughput"]} if t else None
    # the cost at each size
    cost = []
    for r in measured:
        if r["throughput"] and not r["oversubscribed"]:
            cost.append({"size": r["size"], "nodes": r.get("nodes", 1), "throughput": r["throughput"],
                         "efficiency": eff(r), "source": "measured"})
    top = max([c["size"] for c in cost] or [0])
    upto = max([target or 0, 2 * (reach["size"] if reach else 1), 4 * top])
    proj = [r for r in rows if top < r["size"] <= upto and r["size"] not in {c["size"] for c in cost}]
    if len(proj) > 6:  # every other power of two beyond, keeping the target and the reach
        keep = {target, reach["size"] if reach else None}
        proj = [r for i, r in enumerate(proj) if i % 2 == len(proj) % 2 or r["size"] in keep]
    for r in proj:
        cost.append({"size": r["size"], "nodes": r["nodes"], "throughput": r["predicted"]["throughput"],
                     "efficiency": r["predicted"]["efficiency"], "source": "model"})
    for c in cost:
        c["wall_h"] = amount / c["throughput"] / 3600
        c["node_hours"] = c["wall_h"] * c["nodes"]
        c["rank_hours"] = c["wall_h"] * c["size"]
    out["cost"] = cost
    out["validation"] = validation
    out["sentences"] = sentences(out, doc)
    return out


def sentences(s: dict, doc: dict) -> dict:
    """The headline, the cost line and the assumptions, in words."""
    env = doc["environment"]
    unit = unit_of(doc)
    who = s["backend"] or "the job"
    head = []
    if s["reach"]:
        r = s["reach"]
        head.append(f"This job ({who}) scales to {_n(r['size'], unit)} ({_n(r['nodes'], 'node')})"
                    f" at {r['efficiency']:.0%} efficiency by the model: the largest size with E ≥ "
                    f"{s['flag_below']:.0%}.")
    else:
        head.append(f"By the model this job ({who}) does not keep E ≥ {s['flag_below']:.0%} beyond one {unit}.")
    meas = [m for m in s["measured"] if m["size"] > 1 and m["efficiency"] is not None]
    if meas:
        head.append("Measured: " + ", ".join(f"E = {m['efficiency']:.2f} at {m['size']}"
                                             + (f" on {m['nodes']} nodes" if m["nodes"] > 1 else "")
                                             + (" (oversubscribed)" if m["oversubscribed"] else "")
                                             for m in meas) + ".")
    t = s.get("target_row")
    if t:
        head.append(f"At the target {_n(t['size'], unit)}: E = {t['efficiency']:.2f}, "
                    f"{t['throughput']:,.0f} samples/s.")
    cost = s["cost"]
    line = ""
    if cost:
        cheap = min(cost, key=lambda c: c["node_hours"])
        within = [c for c in cost if c["efficiency"] is not None and c["efficiency"] >= s["flag_below"]]
        fast = max(within or cost, key=lambda c: c["size"])
        line = (f"Cost of {s['work']}: {cheap['node_hours']:,.3g} node-hours at {_n(cheap['size'], unit)} "
                f"({hours(cheap['wall_h'])} wall time, {cheap['source']})")
        if fast is not cheap:
            line += (f"; {fast['node_hours']:,.3g} node-hours at {_n(fast['size'], unit)} "
                     f"({hours(fast['wall_h'])}, {fast['source']})")
        line += "."
    per_node = (doc["study"].get("predict") or {}).get("ranks_per_node") or env.get("gpus") or env.get("cores")
    assume = (f"Assumptions: efficiency E = X(p) / (p · X₀(1)), against one lone rank of the no-communication "
              f"baseline; measured sizes use the median throughput of {who}, larger sizes the model "
              f"(mpidl scale predict: compute from the 1-rank baseline, the allreduce of the gradients per bucket "
              f"over the links in 'The model' below, stragglers, overlap ω) on {per_node} {unit}s a node; "
              f"node-hours = wall time × nodes, {unit}-hours = wall time × {unit}s; wall time = samples / "
              "throughput, nothing else (no start-up, checkpoints, evaluation or queueing).")
    return {"headline": " ".join(head), "cost": line, "assumptions": assume}


def validation(paths: Optional[list] = None) -> Optional[dict]:
    """The model against the published files (benchmarks/published unless named): per paper and in all."""
    from mpidl.scaling import published

    where = paths or ([published.default_dir()] if published.default_dir() else None)
    if not where:
        return None
    try:
        results, total = published.run([str(p) for p in where])
    except BadInput as e:  # a broken published file must not cost the study its report
        return {"error": str(e)}
    papers = []
    for pub, rows in results:
        s = published.summary(rows)
        papers.append({"paper": pub.title, "rows": len(rows), "mean_abs_points": s["mean_abs_points"],
                       "max_abs_points": s["max_abs_points"], "url": pub.source.url})
    every = [r for _, rows in results for r in rows]
    within = sum(1 for r in every if abs(r["error_points"]) <= published.MISS_POINTS)
    return {"papers": papers, "summary": total["model"], "alpha_beta": total["alpha_beta"], "rows": every,
            "within": within, "bound": published.MISS_POINTS}


def validation_line(v: Optional[dict]) -> str:
    if not v:
        return "The model has not been held against published results here (no benchmarks/published)."
    if "error" in v:
        return f"The model's record against published results is unavailable: {v['error']}"
    s, b = v["summary"], v["alpha_beta"]
    return (f"Held against {s['rows']} published rows from {len(v['papers'])} papers (never fitted to them): mean "
            f"|error| {s['mean_abs_points']:.1f} points, max {s['max_abs_points']:.1f}; {v['within']} of "
            f"{s['rows']} within ±{v['bound']}; the α-β model before: mean {b['mean_abs_points']:.1f}, "
            f"max {b['max_abs_points']:.1f}.")


def unit_of(doc: dict) -> str:
    return "GPU" if doc["environment"].get("gpus") else "rank"


def cost_view(s: dict, unit: str = "rank") -> tuple[list[str], list[list[str]]]:
    head = [f"{unit}s", "nodes", "samples/s", "E", "wall time", "node-hours", f"{unit}-hours", "from"]
    body = [[f"{c['size']:,}", f"{c['nodes']:,}", f"{c['throughput']:,.0f}",
             "–" if c["efficiency"] is None else f"{c['efficiency']:.2f}", hours(c["wall_h"]),
             f"{c['node_hours']:,.3g}", f"{c['rank_hours']:,.3g}", c["source"]] for c in s["cost"]]
    return head, body


def validation_view(v: Optional[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["paper", "rows", "mean |error|", "max |error|"]
    if not v or "error" in v:
        return head, []
    return head, [[p["paper"], str(p["rows"]), f"{p['mean_abs_points']:.1f}", f"{p['max_abs_points']:.1f}"]
                  for p in v["papers"]]


def misses_view(v: Optional[dict]) -> list[str]:
    """Each published row the model misses by more than the bound, and why, in words."""
    from mpidl.scaling import published

    if not v or "error" in v:
        return []
    return [f"{r['paper']}, {r['model']} at {r['gpus']:,} GPUs misses by {r['error_points']:+.1f} points: "
            + published.why(r) for r in v["rows"] if abs(r["error_points"]) > v["bound"]]


def rows_view(v: Optional[dict]) -> tuple[list[str], list[list[str]]]:
    """Every published row against the model, for the model's section."""
    head = ["paper", "model", "GPUs", "published", "predicted", "diff (points)", "α-β only (before)", "algorithm"]
    if not v or "error" in v:
        return head, []
    return head, [[r["paper"], r["model"], f"{r['gpus']:,}", f"{r['published']:.3f}", f"{r['predicted']:.3f}",
                   f"{r['error_points']:+.1f}", f"{r['alpha_beta']:.3f}", r["algorithm"]] for r in v["rows"]]

