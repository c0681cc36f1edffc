"""The performance model: step time, throughput and efficiency at sizes not measured.

Inputs, all explicit: compute time per step (T_c) or per sample and fixed per step; the bytes of
gradients allreduced per step (S = parameters × bytes per parameter); ranks (GPUs) per node g;
the sizes p = N·g to predict; and each link as latency α (s) and bandwidth B (bytes/s, β = 1/B):
measured by benchmarks/bench_allreduce.py, a preset, or given numbers.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from mpidl.errors import BadInput

FORMULAS = """\
Allreduce of S bytes over p ranks, one link (α, β), ring algorithm (nccl-tests, Thakur et al.):
  T_ring(p, S)  = 2(p−1)·α + 2·(p−1)/p · S·β  [+ (p−1)/p · S·γ, the reduction arithmetic, γ = 0 unless given]
  busbw         = algbw · 2(p−1)/p, algbw = S / T   (so β = 1/busbw asymptotically)
Across N nodes of g ranks (p = N·g), intra link (α_i, β_i), node network (α_e, β_e),
β_e = 1 / (NICs per node × NIC bandwidth):
  flat ring     T = 2(p−1) · max(α_i + (S/p)·β_i,  α_e + (S/p)·β_e)
                (every step waits for its slowest hop; NCCL-style parallel rings let one
                 ring edge leaving a node use all its NICs)
  hierarchical  T = 2(g−1)·α_i + 2·(g−1)/g · S·β_i          reduce-scatter + all-gather in the node
                  + 2(N−1)·α_e + 2·(N−1)/N · S·β_e          allreduce of the node's S/g shards,
                                                             the g shards in parallel through the NICs
Step time with compute T_c and overlap ω (share of compute that can hide communication):
  T(p) = T_c(p) + max(T_ar − ω·T_c(p),  T_ar(min(S, bucket)))
  ω = 2/3 by default: backward is about 2/3 of forward+backward (it computes gradients for
  activations and for weights, about twice forward's work), and a bucket's allreduce can start
  only once backward has produced its gradients; the last bucket has nothing left to hide
  behind, so its allreduce is always exposed. ω = 0 is no overlap (T = T_c + T_ar).
  Communication is assumed not to slow compute (NCCL kernels take some SMs; CPU ranks that
  progress MPI spend core time: measured CPU points include that, the model does not).
Compute per step:
  weak   (b samples per rank)   T_c(p) = T_c(1)                 = fixed + b·t_sample
  strong (B samples per step)   T_c(p) = fixed + (B/p)·t_sample  (t_sample = T_c(1)/B when only T_c(1) is given)
  contention (from a study):    T_c(p) / L(min(p, g)), L the measured no-communication baseline's
                                efficiency: sharing a node costs what it cost when measured, and
                                no more once the node is full
Throughput and efficiency:
  X(p) = p·b / T(p) (weak),  B / T(p) (strong);   E(p) = X(p) / (p·X(1)),  X(1) = X at p = 1 (no communication)
Fits to measured speedups S(p) = X(p)/X(1), least squares in the linear forms (p > 1):
  Amdahl (strong)     S(p) = 1 / (s + (1−s)/p):   s = Σ x·y / Σ x²,  x = 1 − 1/p, y = 1/S − 1/p
  Gustafson (weak)    S(p) = s + (1−s)·p:         s = Σ x·y / Σ x²,  x = p − 1,  y = p − S
  (s: the serial fraction; 0 is perfect scaling)
Measured links (benchmarks/bench_allreduce.py; --intra/--inter measured[:FILE[:BACKEND]] or FILE.json):
  each placement's median times t(S) fitted by least squares, weights 1/t², to the ring model
  over its n ranks, t(S) = 2(n−1)·α + 2(n−1)/n · S·β (the formula the predictions use).
  intra: the one-node fit (`fits`) at the largest rank count measured.
  inter: the fit across nodes (`inter_node_fits`) of N nodes × 1 rank: every ring step crosses
         the network, so α_e and β_e are the network's as an allreduce sees it, library and
         TCP/verbs overheads included (with K ranks a node: the flat ring's slowest hop).
  Assumed: that per-step cost holds at every node count (a non-blocking fabric: no congestion,
  no topology), for one rank's path through the node's NIC; --nics-per-node multiplies it as
  it does a preset.
"""


@dataclass(frozen=True)
class Link:
    name: str
    alpha: float      # seconds per message step
    bandwidth: float  # bytes/s: the bus bandwidth an allreduce reaches on this link
    note: str = ""

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth


GB = 1e9

# Orders of magnitude to plan with; a measured fit (bench_allreduce) replaces them. Bandwidths are
# what an allreduce reaches (busbw), not line rates; α is a per-step latency (point-to-point
# latency plus the library's protocol overhead).
PRESETS: dict[str, Link] = {
    "25GbE": Link("25GbE", 10e-6, 2.8 * GB, "25 Gb/s Ethernet (RoCE or TCP): 3.1 GB/s line, ~90% reached"),
    "IB-100": Link("IB-100", 3e-6, 12 * GB, "100 Gb/s InfiniBand (EDR/HDR100): ~12 GB/s per NIC"),
    "IB-200": Link("IB-200", 3e-6, 24 * GB, "200 Gb/s InfiniBand (HDR): ~24 GB/s per NIC"),
    "IB-400": Link("IB-400", 3e-6, 48 * GB, "400 Gb/s InfiniBand (NDR): 46–49 GB/s per NIC measured"),
    "NVLink": Link("NVLink", 1e-6, 370 * GB, "H100 NVLink/NVSwitch, 8 GPUs: ring busbw ~370 GB/s"),
}


def ring_allreduce(p: int, nbytes: float, link: Link, gamma: float = 0.0) -> float:
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * link.alpha + 2 * (p - 1) / p * nbytes * link.beta + (p - 1) / p * nbytes * gamma


def flat_ring_allreduce(nodes: int, per_node: int, nbytes: float, intra: Link, inter: Link,
                        gamma: float = 0.0) -> float:
    p = nodes * per_node
    if nodes == 1:
        return ring_allreduce(per_node, nbytes, intra, gamma)
    chunk = nbytes / p
    hop = max(intra.alpha + chunk * intra.beta, inter.alpha + chunk * inter.beta) if per_node > 1 \
        else inter.alpha + chunk * inter.beta
    return 2 * (p - 1) * hop + (p - 1) / p * nbytes * gamma


def hierarchical_allreduce(nodes: int, per_node: int, nbytes: float, intra: Link, inter: Link,
                           gamma: float = 0.0) -> float:
    g, n = per_node, nodes
    t = 0.0
    if g > 1:
        t += 2 * (g - 1) * intra.alpha + 2 * (g - 1) / g * nbytes * intra.beta
    if n > 1:
        t += 2 * (n - 1) * inter.alpha + 2 * (n - 1) / n * nbytes * inter.beta
    p = n * g
    return t + ((p - 1) / p * nbytes * gamma if p > 1 else 0.0)


def node_link(nic: Link, nics_per_node: int) -> Link:
    return Link(f"{nic.name}×{nics_per_node}" if nics_per_node > 1 else nic.name, nic.alpha,
                nic.bandwidth * nics_per_node, nic.note)


def step_time(t_compute: float, t_allreduce: float, t_last_bucket: float, overlap: float) -> float:
    """T = T_c + max(T_ar − ω·T_c, T_ar(last bucket))."""
    exposed = max(t_allreduce - overlap * t_compute, min(t_allreduce, t_last_bucket))
    return t_compute + exposed


@dataclass
class Workload:
    mode: str                        # weak | strong
    batch: int                       # weak: per rank; strong: global
    grad_bytes: float
    step_s: Optional[float] = None   # compute per step: weak at the per-rank batch, strong at 1 rank
    per_sample_s: Optional[float] = None
    fixed_s: float = 0.0
    limit: Optional[dict[int, float]] = None  # measured machine limit L(q) (contention), q ≤ ranks per node

    def compute(self, p: int, per_node: int) -> float:
        if self.mode == "weak":
            t = self.step_s if self.step_s is not None else self.fixed_s + self.batch * self.per_sample_s
        else:
            per_sample = self.per_sample_s if self.per_sample_s is not None else self.step_s / self.batch
            fixed = self.fixed_s if self.per_sample_s is not None else 0.0
            t = fixed + self.batch / p * per_sample
        return t / self.contention(min(p, per_node))

    def contention(self, q: int) -> float:
        """L at the largest measured size ≤ q (1 when nothing was measured)."""
        if not self.limit:
            return 1.0
        known = [s for s in self.limit if s <= q]
        return self.limit[max(known)] if known else 1.0

    def samples(self, p: int) -> float:
        return p * self.batch if self.mode == "weak" else self.batch


@dataclass
class Machine:
    ranks_per_node: int
    intra: Link
    inter: Link  # the node's network: NICs per node already folded in (node_link)


def layout(p: int, ranks_per_node: int) -> tuple[int, int]:
    """(nodes, ranks per node) for p ranks: full nodes, or one partly filled node."""
    if p <= ranks_per_node:
        return 1, p
    if p % ranks_per_node:
        raise BadInput(f"size {p} is not a whole number of nodes of {ranks_per_node} ranks")
    return p // ranks_per_node, ranks_per_node


def predict(work: Workload, machine: Machine, sizes: Sequence[int], overlap: float = 2 / 3,
            bucket_bytes: float = 25 * 2**20, gamma: float = 0.0) -> list[dict]:
    """One row per size: compute, allreduce times, step times, throughput and efficiency."""
    if work.mode == "weak" and work.step_s is None and work.per_sample_s is None:
        raise BadInput("predict: give the compute time per step, or per sample")
    if work.mode == "strong" and work.step_s is None and work.per_sample_s is None:
        raise BadInput("predict: give the compute time per step at 1 rank, or per sample")
    g = machine.ranks_per_node
    x1 = work.samples(1) / work.compute(1, g)
    rows = []
    for p in sizes:
        nodes, per_node = layout(p, g)
        tc = work.compute(p, per_node)
        last = min(work.grad_bytes, bucket_bytes)
        algos = {
            "ring": (flat_ring_allreduce(nodes, per_node, work.grad_bytes, machine.intra, machine.inter, gamma),
                     flat_ring_allreduce(nodes, per_node, last, machine.intra, machine.inter, gamma)),
            "hierarchical": (hierarchical_allreduce(nodes, per_node, work.grad_bytes, machine.intra, machine.inter,
                                                    gamma),
                             hierarchical_allreduce(nodes, per_node, last, machine.intra, machine.inter, gamma)),
        }
        row = {"size": p, "nodes": nodes, "ranks_per_node": per_node, "compute_s": tc}
        for name, (t_ar, t_last) in algos.items():
            row[f"allreduce_{name}_s"] = t_ar
            for label, w in (("no_overlap", 0.0), ("overlap", overlap)):
                t = step_time(tc, t_ar, t_last, w)
                x = work.samples(p) / t
                row[f"{name}_{label}"] = {"step_s": t, "throughput": x, "efficiency": x / (p * x1),
                                          "comm_share": 1 - tc / t}
        best = min(("ring", "hierarchical"), key=lambda a: row[f"{a}_overlap"]["step_s"])
        row["best"] = best
        row["predicted"] = row[f"{best}_overlap"]
        rows.append(row)
    return rows


def fit_amdahl(sizes: Sequence[int], speedups: Sequence[float]) -> Optional[float]:
    """Serial fraction s of S(p) = 1/(s + (1−s)/p), least squares on 1/S − 1/p = s(1 − 1/p)."""
    xs = [(1 - 1 / p, 1 / s - 1 / p) for p, s in zip(sizes, speedups) if p > 1]
    den = sum(x * x for x, _ in xs)
    return sum(x * y for x, y in xs) / den if den else None


def fit_gustafson(sizes: Sequence[int], speedups: Sequence[float]) -> Optional[float]:
    """Serial fraction s of S(p) = s + (1−s)·p, least squares on p − S = s(p − 1)."""
    xs = [(p - 1, p - s) for p, s in zip(sizes, speedups) if p > 1]
    den = sum(x * x for x, _ in xs)
    return sum(x * y for x, y in xs) / den if den else None


def amdahl(s: float, p: int) -> float:
    return 1 / (s + (1 - s) / p)


def gustafson(s: float, p: int) -> float:
    return s + (1 - s) * p


def powers_of_two(upto: int) -> list[int]:
    return [2**k for k in range(int(math.log2(upto)) + 1)]


def measured_link(path: Path, backend: Optional[str] = None, ranks: Optional[int] = None,
                  inter: bool = False) -> Link:
    """α and bandwidth fitted by bench_allreduce: the named backend (default mpi, else the first).

    Intra-node (its JSON's `fits`, by rank count): at the named rank count, default the largest
    measured. Inter-node (`inter_node_fits`, by placement NxK): the placement with one rank per
    node and the most nodes (every ring step crosses the network), else the one with most ranks.
    """
    key, what = ("inter_node_fits", "inter-node") if inter else ("fits", "intra-node")
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: allreduce results not found") from None
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or "fits" not in data:
        raise BadInput(f"{path}: not a bench_allreduce result (no 'fits')")
    fits = data.get(key) or {}
    if not fits:
        how = ("bench_allreduce ran on one node only: measure across nodes (--placements 2x1 --hosts A,B), "
               "or give a preset or numbers" if inter else "bench_allreduce ran no one-node placement (--ranks 2)")
        raise BadInput(f"{path}: no {what} fit ({key}): {how}")
    name = backend or ("mpi" if "mpi" in fits else next(iter(fits)))
    if name not in fits:
        raise BadInput(f"{path}: no {what} fit for backend {name!r} (have: {', '.join(fits)})")
    by = fits[name]
    if inter:
        where = max(by, key=lambda k: (by[k].get("ranks_per_node") == 1, by[k]["nodes"] * by[k]["ranks_per_node"]))
        label = f"{by[where]['nodes']} nodes × {by[where]['ranks_per_node']}"
    else:
        where = str(ranks) if ranks is not None else max(by, key=int)
        if where not in by:
            raise BadInput(f"{path}: backend {name} was not measured at {ranks} ranks (have: {', '.join(by)})")
        label = f"p={where}"
    f = by[where]
    if not f.get("bandwidth_GBps") or f.get("alpha_s") is None or f["alpha_s"] < 0:
        raise BadInput(f"{path}: the {what} {name} fit at {label} has no usable bandwidth (too noisy): "
                       "rerun bench_allreduce")
    machine = data.get("machine", {}).get("name", "")
    return Link(f"measured {name} {label}" + (f" ({machine})" if machine else ""), f["alpha_s"],
                f["bandwidth_GBps"] * GB, f"fitted by bench_allreduce on {machine or 'this machine'}"
                + (f", {label} across nodes" if inter else ""))


def _measured(where: str, text: str, path: Path, backend: Optional[str], inter: bool) -> Link:
    try:
        return measured_link(path, backend, inter=inter)
    except BadInput as e:  # name the option too: which of --intra/--inter (or predict.*) asked
        raise BadInput(f"{where} = {text!r}: {e}") from None


def parse_link(text: str, where: str, default_file: Optional[Path] = None, inter: bool = False) -> Link:
    """A preset name, 'measured[:FILE[:BACKEND]]', a bench_allreduce JSON's path, or
    'ALPHA_S,BANDWIDTH_GBPS'. `inter`: the link between nodes (the JSON's inter-node fit)."""
    if text in PRESETS:
        return PRESETS[text]
    if text == "measured" or text.startswith("measured:"):
        parts = text.split(":")
        path = Path(parts[1]) if len(parts) > 1 and parts[1] else default_file
        if path is None:
            raise BadInput(f"{where} = {text!r}: name the bench_allreduce JSON (measured:FILE[:BACKEND])")
        return _measured(where, text, path, parts[2] if len(parts) > 2 else None, inter)
    if text.endswith(".json"):
        return _measured(where, text, Path(text), None, inter)
    try:
        a, bw = (float(v) for v in text.split(","))
        if a < 0 or bw <= 0:
            raise ValueError
    except ValueError:
        raise BadInput(f"{where} = {text!r}: give a preset ({', '.join(PRESETS)}), measured:FILE[:BACKEND], "
                       "a bench_allreduce JSON, or ALPHA_S,BANDWIDTH_GBPS") from None
    return Link(f"α={a:g}s B={bw:g}GB/s", a, bw * GB)


def link_dict(link: Link) -> dict:
    return {**asdict(link), "bandwidth_GBps": link.bandwidth / GB}


def from_study(doc: dict, intra: Optional[str] = None, inter: Optional[str] = None,
               allreduce: Optional[Path] = None) -> tuple[Workload, Machine, dict]:
    """The model's inputs as a study measured them, and what was assumed (for the report).

    compute per step: the no-communication baseline at 1 rank (data + compute + optimizer),
    else the fastest backend at 1 rank less its sync; contention: the baseline's L(q) at the
    measured sizes that fit one node; gradient bytes: the model's trainable parameters ×
    bytes per parameter; links: the study's `predict` section unless given here.
    """
    s, env = doc["study"], doc["environment"]
    pred = s.get("predict") or {}
    table = doc.get("table") or []
    at1 = {r["backend"]: r for r in table if r["size"] == 1}
    if "none" in at1:
        step_s, source = at1["none"]["step_time"], "no-communication baseline at 1 rank"
    elif at1:
        r = min(at1.values(), key=lambda r: r["step_time"])
        step_s, source = r["step_time"] - (r.get("sync") or 0.0), f"{r['backend']} at 1 rank, less its sync"
    else:
        raise BadInput(f"{doc.get('study_file', 'study')}: no 1-rank point measured: the model needs T_c(1)")
    params = (doc.get("model_inputs") or {}).get("grad_params")
    if not params:
        raise BadInput(f"{doc.get('study_file', 'study')}: the study did not record the model's parameter count")
    gpn = pred.get("ranks_per_node") or env.get("gpus") or env.get("cores") or 1
    limit = {r["size"]: r["machine_limit"] for r in table
             if r["backend"] == "none" and r.get("machine_limit") and not r["oversubscribed"] and r["size"] <= gpn}
    points = [pt for pt in doc.get("points", [])]
    batch = points[0]["batch_per_rank"] if s["mode"] == "weak" else points[0]["global_batch"]
    work = Workload(s["mode"], batch, params * pred.get("bytes_per_param", 4), step_s=step_s, limit=limit or None)

    def link(spec, where: str, between_nodes: bool) -> Link:
        if isinstance(spec, dict):
            return Link(f"α={spec['alpha_s']:g}s B={spec['bandwidth_GBps']:g}GB/s", spec["alpha_s"],
                        spec["bandwidth_GBps"] * GB)
        return parse_link(spec, where, allreduce, inter=between_nodes)

    machine = Machine(int(gpn), link(intra or pred.get("intra", "measured"), "predict.intra", False),
                      node_link(link(inter or pred.get("inter", "IB-100"), "predict.inter", True),
                                int(pred.get("nics_per_node", 1))))
    assumed = {"compute_source": source, "compute_s": step_s, "grad_params": params,
               "bytes_per_param": pred.get("bytes_per_param", 4), "grad_bytes": work.grad_bytes,
               "ranks_per_node": machine.ranks_per_node, "contention_limit": limit,
               "intra": link_dict(machine.intra), "inter": link_dict(machine.inter),
               "overlap": pred.get("overlap", 2 / 3), "bucket_mb": pred.get("bucket_mb", 25),
               "max_ranks": pred.get("max_ranks", 4096)}
    return work, machine, assumed
