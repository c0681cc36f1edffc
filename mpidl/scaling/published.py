"""Published scaling results as data, and the performance model held against them.

A file under benchmarks/published/ holds one paper or table: its source, the hardware (GPUs per
node, the links in a node and between nodes with their bandwidths), the software (the allreduce
library and algorithms it ran, overlap, gradient bucket), and per model its parameters, gradient
bytes, batch per GPU, the single-GPU throughput the efficiencies are relative to, and the
published efficiencies. Every figure says where it comes from: {value, source} or
{value, estimate} (the reasoning of an estimate, in words). Nothing in a file is fitted to the
efficiencies it holds: the model takes the inputs and predicts the rows.

`mpidl scale predict --published FILE|DIR ...` prints model against paper, row by row, with what
each term of the model adds, and a summary line.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Generic, Literal, Optional, TypeVar, Union

from pydantic import Field, model_validator

from mpidl.config import Strict, read_yaml, validate
from mpidl.errors import BadInput
from mpidl.scaling import model

T = TypeVar("T")
Positive = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(ge=0, le=1)]
Algorithm = Literal["ring", "tree", "hierarchical", "torus2d", "recursive_doubling", "rabenseifner"]


class Fig(Strict, Generic[T]):
    """A figure and where it comes from: a source (paper, table, docs, a measurement), or the
    reasoning of an estimate."""

    value: T
    source: Optional[str] = Field(default=None, min_length=3)
    estimate: Optional[str] = Field(default=None, min_length=3)

    @model_validator(mode="after")
    def _provenance(self):
        if (self.source is None) == (self.estimate is None):
            raise ValueError("give source (where the figure is published) or estimate (how it was estimated), "
                             "one of them")
        return self

    @property
    def estimated(self) -> bool:
        return self.estimate is not None


class Source(Strict):
    citation: str = Field(min_length=10)
    url: str = Field(pattern=r"^https://\S+$")
    rows: str = Field(min_length=3, description="where in the paper (or its docs) the efficiencies are")


class LinkSpec(Strict):
    name: str
    kind: Literal["nvlink", "pci", "net"] = Field(description="NCCL's latency per hop is by kind")
    bandwidth_GBps: Fig[Positive] = Field(description="what an allreduce reaches (busbw), per NIC between nodes")
    latency_us: Optional[Fig[Annotated[float, Field(ge=0)]]] = Field(
        default=None, description="per hop; default: NCCL's for the kind (src/graph/tuning.cc)")
    nics_per_node: Optional[Fig[Count]] = None


class Hardware(Strict):
    gpu: str
    compute_capability: float = Field(gt=0, description="NVIDIA's; below 8.0 NCCL's ring plateau is 1.9, else 1.4")
    gpus_per_node: Fig[Count]
    intra: LinkSpec
    inter: LinkSpec

    @model_validator(mode="after")
    def _nics(self):
        if self.inter.nics_per_node is None:
            raise ValueError("inter.nics_per_node: how many NICs a node has (the node's bandwidth is NICs × NIC)")
        if self.intra.nics_per_node is not None:
            raise ValueError("intra.nics_per_node: NICs are for the link between nodes")
        return self


class Software(Strict):
    framework: str
    library: Literal["nccl", "mpi"]
    algorithms: Fig[Annotated[list[Algorithm], Field(min_length=1)]]
    nccl: Optional[Fig[Literal["2.5", "2.18"]]] = Field(
        default=None, description="which release's cost model prices NCCL's calls (model.NCCL_TUNING): "
                                  "2.5 for NCCL before 2.5 (v2.5.6-1's tuning.cc, the first), 2.18 by default")
    overlap: Fig[Share] = Field(description="ω: share of compute that can hide communication")
    bucket_mb: Fig[Optional[Positive]] = Field(description="MiB per allreduce call; null: all gradients in one call")
    cycle_ms: Optional[Fig[Positive]] = Field(
        default=None, description="tensor fusion's cycle (Horovod): what is ready goes out every cycle; "
                                  "absent: a call when a full bucket is ready (DDP)")
    jitter_cv: Optional[Fig[Annotated[float, Field(ge=0, le=1)]]] = Field(
        default=None, description="σ of a GPU's step time; default the model's (1%, an estimate)")


class Row(Strict):
    gpus: Count
    efficiency: float = Field(gt=0, le=1.2, description="throughput / (GPUs × one GPU's throughput)")
    source: str = Field(min_length=3)


class PublishedModel(Strict):
    name: str
    params: Fig[Count] = Field(description="parameters whose gradients are allreduced")
    bytes_per_param: Fig[Literal[2, 4]]
    batch_per_gpu: Fig[Count]
    single_gpu_samples_per_s: Fig[Positive]
    rows: list[Row] = Field(min_length=1)


class Published(Strict):
    title: str
    source: Source
    hardware: Hardware
    software: Software
    models: list[PublishedModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _sizes(self):
        g = self.hardware.gpus_per_node.value
        for i, m in enumerate(self.models):
            for j, r in enumerate(m.rows):
                if r.gpus > g and r.gpus % g:
                    raise ValueError(f"models.{i}.rows.{j}.gpus = {r.gpus}: not a whole number of nodes of "
                                     f"{g} GPUs")
        return self


def load(path: Union[str, Path]) -> Published:
    """Read and validate one published file; BadInput with one line naming the file, key and value."""
    path = Path(path)
    return validate(Published, read_yaml(path, "published results"), str(path))


def files(paths: list[str]) -> list[Path]:
    """The files named, a folder standing for its *.yaml."""
    out: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            found = sorted(p.glob("*.yaml"))
            if not found:
                raise BadInput(f"{p}: no published *.yaml files here")
            out += found
        else:
            out.append(p)
    return out


def default_dir() -> Optional[Path]:
    """benchmarks/published of the checkout mpidl runs from, if it is there."""
    d = Path(__file__).resolve().parents[2] / "benchmarks" / "published"
    return d if d.is_dir() else None


def _link(spec: LinkSpec, nics: int = 1, nccl: str = "2.18") -> model.Link:
    if spec.latency_us is not None:  # a stated latency is used as is, under NCCL too (no kind)
        link = model.Link(spec.name, spec.latency_us.value * 1e-6, spec.bandwidth_GBps.value * model.GB)
    else:  # α (the α-β column's) is the release's Simple ring hop for the kind
        link = model.Link(spec.name, model.NCCL_TUNING[nccl]["hop"]["ring"]["Simple"][spec.kind],
                          spec.bandwidth_GBps.value * model.GB, kind=spec.kind)
    return model.node_link(link, nics)


def inputs(pub: Published, m: PublishedModel, jitter: Optional[float] = None):
    """The model's inputs for one model of a paper: (Workload, Machine, overlap, bucket bytes, cycle s)."""
    hw, sw = pub.hardware, pub.software
    gpu = "pre-ampere" if hw.compute_capability < 8.0 else "ampere+"
    assert hw.inter.nics_per_node is not None  # Hardware._nics requires it
    nccl = sw.nccl.value if sw.nccl else "2.18"
    coll = model.library(sw.library, sw.algorithms.value, gpu=gpu, nccl=nccl)
    machine = model.Machine(hw.gpus_per_node.value, _link(hw.intra, nccl=nccl),
                            _link(hw.inter, hw.inter.nics_per_node.value, nccl), coll)
    cv = jitter if jitter is not None else (sw.jitter_cv.value if sw.jitter_cv else model.JITTER_CV)
    work = model.Workload("weak", m.batch_per_gpu.value, float(m.params.value * m.bytes_per_param.value),
                          step_s=m.batch_per_gpu.value / m.single_gpu_samples_per_s.value, jitter_cv=cv)
    grad = work.grad_bytes
    bucket = sw.bucket_mb.value * 2**20 if sw.bucket_mb.value is not None else grad
    cycle = sw.cycle_ms.value * 1e-3 if sw.cycle_ms else 0.0
    return work, machine, sw.overlap.value, bucket, cycle


def estimates(pub: Published, m: PublishedModel) -> list[str]:
    """The inputs of a model's rows that are estimates, by key."""
    out = []
    hw, sw = pub.hardware, pub.software
    for key, fig in (("gpus_per_node", hw.gpus_per_node), ("intra bandwidth", hw.intra.bandwidth_GBps),
                     ("inter bandwidth", hw.inter.bandwidth_GBps), ("NICs per node", hw.inter.nics_per_node),
                     ("algorithms", sw.algorithms), ("NCCL release", sw.nccl), ("overlap", sw.overlap),
                     ("bucket", sw.bucket_mb),
                     ("fusion cycle", sw.cycle_ms),
                     ("jitter", sw.jitter_cv), ("params", m.params), ("gradient bytes", m.bytes_per_param),
                     ("batch per GPU", m.batch_per_gpu), ("single-GPU throughput", m.single_gpu_samples_per_s)):
        if fig is not None and fig.estimated:
            out.append(key)
    return out


def _solve(f, target: float, lo: float = 1 / 64, hi: float = 64.0) -> Optional[float]:
    """x in [lo, hi] with f(x) = target for f increasing in x (bisection in log space), or None."""
    if not f(lo) <= target <= f(hi):
        return None
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return math.sqrt(lo * hi)


def would_match(pub: Published, m: PublishedModel, gpus: int, target: float) -> dict:
    """What a missed row would need: the network bandwidth, or the single-GPU throughput, that makes
    the prediction equal the published figure, all else as stated. A diagnosis for the reader,
    never fed back into a prediction."""
    work, machine, overlap, bucket, cycle = inputs(pub, m)

    def eff(w: model.Workload, mach: model.Machine) -> float:
        return model.predict(w, mach, [gpus], overlap, bucket, cycle_s=cycle)[0]["predicted"]["efficiency"]

    def by_network(k: float) -> float:
        inter = model.Link(machine.inter.name, machine.inter.alpha, machine.inter.bandwidth * k,
                           kind=machine.inter.kind)
        return eff(work, model.Machine(machine.ranks_per_node, machine.intra, inter, machine.collective))

    def by_gpu(k: float) -> float:  # a slower GPU (k > 1: longer compute) hides more communication
        return eff(model.Workload(**{**work.__dict__, "step_s": work.step_s * k}), machine)

    net, gpu = _solve(by_network, target), _solve(by_gpu, target)
    nic = pub.hardware.inter.bandwidth_GBps.value
    return {"inter_GBps_per_nic": nic * net if net else None,
            "single_gpu_samples_per_s": m.single_gpu_samples_per_s.value / gpu if gpu else None}


def compare(pub: Published, name: str = "") -> list[dict]:
    """Each published row against the model: the full model, and its terms one by one (α-β only as
    before issue 24; + per-call latency and the library's algorithms; + stragglers)."""
    rows = []
    for m in pub.models:
        work, machine, overlap, bucket, cycle = inputs(pub, m)
        sizes = [r.gpus for r in m.rows]
        full = {r["size"]: r for r in model.predict(work, machine, sizes, overlap, bucket, cycle_s=cycle)}
        calm = model.Workload(**{**work.__dict__, "jitter_cv": 0.0})
        latency = {r["size"]: r for r in model.predict(calm, machine, sizes, overlap, bucket, cycle_s=cycle)}
        v1 = {r["size"]: r for r in model.predict_v1(calm, machine, sizes, overlap, bucket)}
        for r in m.rows:
            f = full[r.gpus]
            step = f["predicted"]["step_s"]
            rows.append({"file": name, "paper": pub.title, "model": m.name, "gpus": r.gpus, "nodes": f["nodes"],
                         "published": r.efficiency, "predicted": f["predicted"]["efficiency"],
                         "error_points": 100 * (f["predicted"]["efficiency"] - r.efficiency),
                         "alpha_beta": v1[r.gpus]["efficiency"], "with_latency": latency[r.gpus]["predicted"]
                         ["efficiency"], "algorithm": f["best"], "calls": f["calls"],
                         "compute_ms": 1e3 * f["compute_no_stragglers_s"],
                         "stragglers_ms": 1e3 * (f["compute_s"] - f["compute_no_stragglers_s"]),
                         "allreduce_ms": 1e3 * f["allreduce_s"], "exposed_ms": 1e3 * (step - f["compute_s"]),
                         "step_ms": 1e3 * step, "estimates": estimates(pub, m), "row_source": r.source,
                         "assumed_inter_GBps_per_nic": pub.hardware.inter.bandwidth_GBps.value,
                         "assumed_single_gpu_samples_per_s": m.single_gpu_samples_per_s.value})
            if abs(rows[-1]["error_points"]) > MISS_POINTS:
                rows[-1]["would_match"] = would_match(pub, m, r.gpus, r.efficiency)
    return rows


def summary(rows: list[dict], key: str = "predicted") -> dict:
    errs = [abs(100 * (r[key] - r["published"])) for r in rows]
    worst = max(range(len(rows)), key=lambda i: errs[i], default=0)  # read only when there are rows
    return {"rows": len(rows), "mean_abs_points": sum(errs) / len(errs) if errs else math.nan,
            "max_abs_points": errs[worst] if rows else math.nan,
            "worst": f"{rows[worst]['model']} at {rows[worst]['gpus']} GPUs ({rows[worst]['paper']})" if rows else ""}


MISS_POINTS = 5  # the goal: every row within ±5 points; a row beyond it says why

TERMS = [
    ("α-β only", "the model before issue 24: one latency per step, a lockstep ring or hierarchical, no stragglers"),
    ("+ latency", "each bucket's allreduce call pays its algorithm's latency by NCCL's own cost model "
                  "(src/graph/tuning.cc) of the release the paper ran (software.nccl): 2(p−1) ring steps, a "
                  "tree's log₂N; for NCCL before 2.5, v2.5.6-1's figures (6.6 µs a step over the network, "
                  "Simple; 0.9 µs, LL, below v2.3.5-5's LL threshold of 8 KiB a rank; 8.4 µs a call; no "
                  "plateau); else v2.18.3-1's (14 µs, ×1.9 or 1.4 plateau); the library's own algorithms only"),
    ("+ stragglers", "the slowest of p GPUs sets the pace: T_c·(1 + σ·m(p)), m(p) = E[max of p standard normals]"),
]


def header(pub: Published) -> str:
    hw, sw = pub.hardware, pub.software
    assert hw.inter.nics_per_node is not None  # Hardware._nics requires it
    nics = hw.inter.nics_per_node.value
    cv = sw.jitter_cv.value if sw.jitter_cv else model.JITTER_CV
    bucket = f"{sw.bucket_mb.value:g} MiB buckets" if sw.bucket_mb.value is not None else "one call for all gradients"
    if sw.cycle_ms:
        bucket = f"tensor fusion every {sw.cycle_ms.value:g} ms up to {sw.bucket_mb.value:g} MiB"
    return (f"{pub.title} ({pub.source.citation}; {pub.source.url})\n"
            f"  {hw.gpus_per_node.value} × {hw.gpu} a node; "
            f"intra {hw.intra.name} {hw.intra.bandwidth_GBps.value:g} GB/s; "
            f"inter {hw.inter.name}{f' ×{nics}' if nics > 1 else ''} {hw.inter.bandwidth_GBps.value:g} GB/s per NIC; "
            f"{sw.library}{f' {sw.nccl.value} cost model' if sw.nccl else ''} [{', '.join(sw.algorithms.value)}]; "
            f"overlap ω {sw.overlap.value:.2f}; {bucket}; σ {cv:.0%}")


def text(results: list[tuple[Published, list[dict]]]) -> str:
    lines = []
    for pub, rows in results:
        lines += [header(pub),
                  f"  {'model':<13} {'GPUs':>5} {'nodes':>5} {'published':>9} {'predicted':>9} {'diff':>6}   "
                  f"{'α-β only':>8} {'+latency':>8} {'+stragglers':>11}  {'algorithm':<12} step = compute + stragglers "
                  "+ exposed comm (ms)"]
        for r in rows:
            lines.append(f"  {r['model']:<13} {r['gpus']:>5} {r['nodes']:>5} {r['published']:>9.3f} "
                         f"{r['predicted']:>9.3f} "
                         f"{r['error_points']:>+6.1f}   {r['alpha_beta']:>8.3f} {r['with_latency']:>8.3f} "
                         f"{r['predicted']:>11.3f}  {r['algorithm']:<12} {r['step_ms']:.1f} = {r['compute_ms']:.1f} + "
                         f"{r['stragglers_ms']:.1f} + {r['exposed_ms']:.1f} ({r['calls']} call"
                         f"{'s' if r['calls'] > 1 else ''}, {r['allreduce_ms']:.1f} ms of allreduce)")
            if abs(r["error_points"]) > MISS_POINTS:
                lines.append(f"    misses by {r['error_points']:+.1f} points: "
                             + why(r))
        lines.append("")
    every = [r for _, rows in results for r in rows]
    s, before = summary(every), summary(every, "alpha_beta")
    lines.append("terms: " + "; ".join(f"{name}: {what}" for name, what in TERMS))
    lines.append(f"summary: {s['rows']} rows from {len(results)} file{'s' if len(results) > 1 else ''}: mean |error| "
                 f"{s['mean_abs_points']:.1f} points, max {s['max_abs_points']:.1f} ({s['worst']}); before (α-β only): "
                 f"mean {before['mean_abs_points']:.1f}, max {before['max_abs_points']:.1f}")
    return "\n".join(lines)


def why(r: dict) -> str:
    """A missed row in words: what the step is made of, and which of its inputs are estimates."""
    share = r["exposed_ms"] / r["step_ms"] if r["step_ms"] else 0.0
    what = (f"exposed communication is {share:.0%} of the predicted step, so the row turns on the network "
            "bandwidth and the overlap" if share > 0.1 else
            "communication is nearly hidden, so the row turns on compute: the single-GPU throughput and stragglers")
    need = r.get("would_match") or {}
    alt = []
    if need.get("inter_GBps_per_nic"):
        alt.append(f"{need['inter_GBps_per_nic']:.2g} GB/s per NIC (assumed {r['assumed_inter_GBps_per_nic']:g})")
    if need.get("single_gpu_samples_per_s"):
        alt.append(f"{need['single_gpu_samples_per_s']:.3g} samples/s on one GPU "
                   f"(assumed {r['assumed_single_gpu_samples_per_s']:g})")
    est = r["estimates"]
    far = [k for k, (v, assumed) in {"net": (need.get("inter_GBps_per_nic"), r["assumed_inter_GBps_per_nic"]),
                                     "gpu": (need.get("single_gpu_samples_per_s"),
                                             r["assumed_single_gpu_samples_per_s"])}.items()
           if v is None or not 1 / 1.5 <= v / assumed <= 1.5]
    if len(far) < 2:
        hint = ""
    elif r["error_points"] > 0:  # optimistic: the paper paid for something the model leaves out
        hint = ("; neither is near its assumed figure, so a cost the model does not hold (its 'Not modelled' "
                "list: congestion, a framework's per-step coordination) is the likelier cause")
    else:  # pessimistic: a cost the model leaves out cannot explain it; one it charges is too high
        hint = ("; neither is near its assumed figure, so a cost the model charges is likelier too high than an "
                "input wrong: the exposed share of the allreduce (overlap ω, an estimate), the algorithm's "
                "latency or the stragglers' spread σ")
    return (what + ("; it would match at " + " or at ".join(alt) if alt else
                    "; no network bandwidth or single-GPU speed alone would match it") + hint
            + (f"; estimates among its inputs: {', '.join(est)}" if est else "; no input is an estimate"))


def run(paths: list[str]) -> tuple[list[tuple[Published, list[dict]]], dict]:
    results = []
    for p in files(paths):
        pub = load(p)
        results.append((pub, compare(pub, p.name)))
    every = [r for _, rows in results for r in rows]
    return results, {"model": summary(every), "alpha_beta": summary(every, "alpha_beta"),
                     "with_latency": summary(every, "with_latency")}
