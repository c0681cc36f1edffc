"""Scaling arithmetic on measured points: medians with spread, speedup, efficiency, shares.

Notation (per backend b, world size p; X = global samples/s, T = seconds per step):

  X_b(p)   throughput, the median over repetitions (each repetition: the median over its
           measured log windows)
  S_b(p)   = X_b(p) / X_b(1)                          speedup (ideal: p)
  E_b(p)   = X_b(p) / (p · X_b(1))                    efficiency against the backend's own 1 rank
           strong (global batch B fixed, X = B/T):   E = T(1) / (p · T(p))
           weak   (batch b per rank,   X = p·b/T):   E = T(1) / T(p)
  L(p)     = X_0(p) / (p · X_0(1))                    the no-communication baseline's efficiency:
                                                      the machine's limit (contention only)
  E*_b(p)  = X_b(p) / (p · X_0(1))                    efficiency against one lone rank that
                                                      communicates nothing (a common reference)
  E*_b(p) / L(p) = X_b(p) / X_0(p)                    the share of the machine's limit reached
  c_b(p)   = 1 − T_0(p) / T_b(p)                      communication share: the part of the step
                                                      the baseline at the same size does not spend
                                                      (exposed communication plus its framework)
  s_b(p)   = sync_b(p) / T_b(p)                       the trainer's sync bucket's share
  KF_b(p)  = (1/S − 1/p) / (1 − 1/p)                  Karp–Flatt serial fraction (p > 1)

The baseline (backend `none`) is b = 0. T_0(p) comes from the same size, so c_b(p) separates
communication from what ranks lose to sharing the machine.

Placement: a study may run a size p on n nodes (p/n ranks each); a point is then (b, p, n), one
node when not said. E is still against the backend's 1 rank, and the baseline is taken at the
same size and placement: L(p, n) = X_0(p, n) / (p · X_0(1)), c_b(p, n) = 1 − T_0(p, n) / T_b(p, n).
Crossing nodes, p ranks on n nodes against the same p on one node:

  R_b(p, n) = X_b(p, n) / X_b(p, 1)                   throughput ratio (1: crossing costs nothing)
  C_b(p, n) = T_b(p, n) − T_0(p, n)                   exposed communication per step
  ΔC_b(p, n) = C_b(p, n) − C_b(p, 1)                  what the network between nodes adds per step
"""
from __future__ import annotations

import statistics
from typing import Iterable, Optional

BUCKETS = ("data", "compute", "sync", "optimizer")

FORMULAS = [
    ("speedup", "S(p) = X(p) / X(1)", "ideal: p"),
    ("efficiency", "E(p) = X(p) / (p · X(1))",
     "strong (fixed global batch): T(1) / (p · T(p)); weak (fixed batch per rank): T(1) / T(p)"),
    ("machine limit", "L(p) = X₀(p) / (p · X₀(1))",
     "the no-communication baseline (backend none) run concurrently at the same size"),
    ("against one lone rank", "E*(p) = X(p) / (p · X₀(1))", "one reference for every backend"),
    ("share of the limit", "E*(p) / L(p) = X(p) / X₀(p)", "goal: ≥ 0.95"),
    ("communication share", "c(p) = 1 − T₀(p) / T(p)", "exposed communication and its framework's cost"),
    ("sync share", "s(p) = sync(p) / T(p)", "the trainer's sync bucket (0 for ddp: its allreduces run in backward)"),
    ("Karp–Flatt", "KF(p) = (1/S − 1/p) / (1 − 1/p)", "the serial fraction the point implies"),
]

# The backend that skips gradient communication (mpidl/train/backends/nocomm.py): one name everywhere.
BASELINE = "none"


def spread(values: Iterable[float]) -> dict:
    """Median, min, max, count and relative range (max − min) / median."""
    v = sorted(float(x) for x in values)
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0, "rel_range": None}
    med = statistics.median(v)
    return {"median": med, "min": v[0], "max": v[-1], "n": len(v),
            "rel_range": (v[-1] - v[0]) / med if med else None}


def speedup(x_p: float, x_1: float) -> float:
    return x_p / x_1


def efficiency(x_p: float, x_1: float, p: int) -> float:
    """E(p) = X(p) / (p · X(1)) in throughput form (strong and weak alike)."""
    return x_p / (p * x_1)


def efficiency_from_times(t_1: float, t_p: float, p: int, mode: str) -> float:
    """The same in step-time form: strong T(1)/(p·T(p)), weak T(1)/T(p)."""
    return t_1 / (p * t_p) if mode == "strong" else t_1 / t_p


def comm_share(t_b: float, t_0: float) -> float:
    return 1.0 - t_0 / t_b


def karp_flatt(s: float, p: int) -> Optional[float]:
    return None if p == 1 else (1 / s - 1 / p) / (1 - 1 / p)


CROSSING_FORMULAS = [
    ("crossing ratio", "R(p, n) = X(p, n) / X(p, 1)", "p ranks on n nodes against the same p ranks on one node"),
    ("communication share", "c(p, n) = 1 − T₀(p, n) / T(p, n)", "the baseline at the same size and placement"),
    ("exposed communication", "C(p, n) = T(p, n) − T₀(p, n)", "seconds per step the baseline does not spend"),
    ("crossing cost", "ΔC(p, n) = C(p, n) − C(p, 1)", "what the network between the nodes adds per step"),
]


def table(points: dict[tuple, dict], mode: str, baseline: str = BASELINE, flag_below: float = 0.8) -> list[dict]:
    """One row per (backend, size, nodes) from aggregated points.

    points[(backend, size, nodes)] (or [(backend, size)]: one node) holds at least `throughput`
    and `step_time` (spread dicts), `breakdown` (bucket -> spread dict or None) and `oversubscribed`.
    """
    points = {(*key, 1)[:3]: pt for key, pt in points.items()}
    rows = []
    for (b, p, n), pt in sorted(points.items(), key=lambda kv: (kv[0][0] == baseline, *kv[0])):
        x, t = pt["throughput"]["median"], pt["step_time"]["median"]
        one = points.get((b, 1, 1))
        base, base_one = points.get((baseline, p, n)), points.get((baseline, 1, 1))
        row = {"backend": b, "size": p, "nodes": n, "ranks_per_node": p // n, "oversubscribed": pt["oversubscribed"],
               "throughput": x, "step_time": t,
               "throughput_min": pt["throughput"]["min"], "throughput_max": pt["throughput"]["max"],
               "repetitions": pt["throughput"]["n"]}
        for k in BUCKETS:
            s = (pt.get("breakdown") or {}).get(k)
            row[k] = s["median"] if s else None
        if one:
            x1 = one["throughput"]["median"]
            row["speedup"] = speedup(x, x1)
            row["efficiency"] = efficiency(x, x1, p)
            row["efficiency_from_times"] = efficiency_from_times(one["step_time"]["median"], t, p, mode)
            row["karp_flatt"] = karp_flatt(row["speedup"], p)
        if base_one:
            x01 = base_one["throughput"]["median"]
            row["efficiency_vs_lone_rank"] = efficiency(x, x01, p)
        if base:
            row["machine_limit"] = efficiency(base["throughput"]["median"], base_one["throughput"]["median"], p) \
                if base_one else None
            row["of_limit"] = x / base["throughput"]["median"]
            row["comm_share"] = comm_share(t, base["step_time"]["median"])
        if row.get("sync") is not None:
            row["sync_share"] = row["sync"] / t
        e = row.get("efficiency_vs_lone_rank", row.get("efficiency"))
        row["flagged"] = e is not None and p > 1 and e < flag_below
        rows.append(row)
    return rows


def goals(rows: list[dict], mode: str, baseline: str = BASELINE) -> list[dict]:
    """The issue's goals, per size and placement, as measured (weak studies; strong ones report,
    not judge).

    best backend: the one of horovod/mpi with the highest E* at the largest size on one node
    that is not oversubscribed.
      (a) E_best(p) ≥ E_ddp(p) and E*_best(p) ≥ E*_ddp(p) at every size (E* = X_best ≥ X_ddp)
      (b) X_best(p) / X_0(p) ≥ 0.95 at every size
    """
    by = {(r["backend"], r["size"], r.get("nodes", 1)): r for r in rows}
    places = sorted({(r["size"], r.get("nodes", 1)) for r in rows})
    cands = [b for b in ("horovod", "mpi") if any(k[0] == b for k in by)]
    out: list[dict] = []
    if not cands or mode != "weak":
        return out
    sizes = sorted({p for p, n in places if n == 1}) or sorted({p for p, _ in places})
    fair = [p for p in sizes if not any(r["oversubscribed"] for r in rows if r["size"] == p)]
    top = max(fair or sizes)  # the largest size the cores can hold decides which backend is best
    best = max(cands, key=lambda b: (by.get((b, top, 1)) or {}).get("efficiency_vs_lone_rank") or 0.0)
    for p, n in places:
        r = by.get((best, p, n))
        if r is None:
            continue
        ddp = by.get(("ddp", p, n))
        for key, sym in (("efficiency", "E"), ("efficiency_vs_lone_rank", "E*")):
            if ddp and r.get(key) is not None and ddp.get(key) is not None:
                out.append({"goal": f"{best} {sym} ≥ ddp {sym}", "size": p, "nodes": n, "value": r[key],
                            "target": ddp[key], "met": r[key] >= ddp[key], "oversubscribed": r["oversubscribed"]})
        if r.get("of_limit") is not None:
            out.append({"goal": f"{best} X / X₀ ≥ 0.95", "size": p, "nodes": n, "value": r["of_limit"],
                        "target": 0.95, "met": r["of_limit"] >= 0.95, "oversubscribed": r["oversubscribed"]})
    return out


def crossing(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Per backend, p ranks on n > 1 nodes against the same p on one node (see CROSSING_FORMULAS)."""
    by = {(r["backend"], r["size"], r.get("nodes", 1)): r for r in rows}
    out = []
    for r in rows:
        n = r.get("nodes", 1)
        one = by.get((r["backend"], r["size"], 1))
        if n == 1 or one is None:
            continue
        row = {"backend": r["backend"], "size": r["size"], "nodes": n, "ranks_per_node": r["size"] // n,
               "throughput_one_node": one["throughput"], "throughput": r["throughput"],
               "ratio": r["throughput"] / one["throughput"], "step_time_one_node": one["step_time"],
               "step_time": r["step_time"], "sync_one_node": one.get("sync"), "sync": r.get("sync"),
               "comm_share_one_node": one.get("comm_share"), "comm_share": r.get("comm_share"),
               "exposed_one_node": None, "exposed": None, "crossing_cost": None}
        base, base_one = by.get((baseline, r["size"], n)), by.get((baseline, r["size"], 1))
        if r["backend"] != baseline and base and base_one:
            row["exposed_one_node"] = one["step_time"] - base_one["step_time"]
            row["exposed"] = r["step_time"] - base["step_time"]
            row["crossing_cost"] = row["exposed"] - row["exposed_one_node"]
        out.append(row)
    return out


def on_one_node(doc: dict) -> dict:
    """The study as if it had measured one node only: what the single-node model and fits take."""
    return {**doc, "table": [r for r in doc.get("table", []) if r.get("nodes", 1) == 1],
            "points": [pt for pt in doc.get("points", []) if pt.get("nodes", 1) == 1]}
