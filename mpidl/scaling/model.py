"""The performance model: step time, throughput and efficiency at sizes not measured.

Inputs, all explicit: compute time per step (T_c) or per sample and fixed per step; the bytes of
gradients allreduced per step (S = parameters × bytes per parameter); ranks (GPUs) per node g;
the sizes p = N·g to predict; and each link as latency α (s) and bandwidth B (bytes/s, β = 1/B):
measured by benchmarks/bench_allreduce.py, a preset, or given numbers.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mpidl.errors import BadInput
from mpidl.scaling.efficiency import BASELINE

FORMULAS = """\
Allreduce of S bytes over p ranks, one link (α, β), ring algorithm (nccl-tests, Thakur et al.):
  T_ring(p, S)  = 2(p−1)·α + 2·(p−1)/p · S·β  [+ (p−1)/p · S·γ, the reduction arithmetic, γ = 0 unless given]
  busbw         = algbw · 2(p−1)/p, algbw = S / T   (so β = 1/busbw asymptotically)
Across N nodes of g ranks (p = N·g), intra link (α_i, β_i), node network (α_e, β_e),
β_e = 1 / (NICs per node × NIC bandwidth). Each algorithm's cost of one allreduce call of n bytes
(--library picks which algorithms may run and takes, per call, the fastest, as NCCL's tuner and
MPI's decision rules do):
  ring, MPI     T = 2(p−1) · max(α_i + (n/p)·β_i,  α_e + (n/p)·β_e)
                (lockstep: each step waits for its slowest hop, the network's)
  ring, NCCL    T = P·[(2(p−1) − 2(N−1))·α_i + 2(N−1)·α_e] + 2(p−1)·(n/p)·max(β_i, β_e)
                (pipelined: a call pays each hop's latency once along the ring, NCCL's
                 src/graph/tuning.cc; P, its "ring plateau", multiplies the latency of a ring
                 that crosses nodes: 1.9 before Ampere, 1.4 from Ampere on; v2.18.3-1's figures)
                NCCL's latencies are by release and protocol (NCCL_TUNING): per call the faster
                of LL (low latency, 1/4 of the bandwidth) and Simple, as ncclTopoGetAlgoTime
                picks. For NCCL before 2.5 (the 2017–2018 papers ran 2.0–2.3: rings only, no cost
                model) v2.5.6-1's tuning.cc, the first: every step of a ring that crosses nodes
                at the network's latency (Simple 6.6 µs, LL 0.9 µs), no plateau, and LL below
                v2.3.5-5's threshold of nRanks × 8 KiB (common_coll.h, one ring taken)
  tree, NCCL    T = 2·((g−1)·α_i + ⌊log₂N⌋·α_e) + ring's bandwidth term / (0.92·c(n))
                (double binary tree, NCCL ≥ 2.4: latency grows with log N, not p; 0.92 and the
                 size correction c(n) are NCCL's own tree bandwidth factors)
  hierarchical  T = 2(g−1)·α_i + 2·(g−1)/g · n·β_i          reduce-scatter + all-gather in the node
                  + P·2(N−1)·α_e + 2·(N−1)/N · n·β_e        allreduce of the node's n/g shards,
                                                             the g shards in parallel through the NICs
  recursive doubling (MPI, small n)   T = ⌈log₂g⌉·(α_i + n·β_i) + ⌈log₂N⌉·(α_e + n·β_e)
  Rabenseifner (MPI, large n)         T = 2·(⌈log₂g⌉·α_i + ⌈log₂N⌉·α_e) + hierarchical's bandwidth terms
  + per call c₀ (NCCL's base latency, 8.4 µs a call; 3 calls for hierarchical and the 2D torus)
  2D torus     rows of x ranks (whole nodes, x near √p) × columns of y = p/x: reduce-scatter and
               all-gather along rows (rings), allreduce of n/x bytes along columns (Mikami et al. 2018)
Gradient buckets: the S bytes go out in k = ⌈S / bucket⌉ calls (DDP's bucket_cap_mb 25, Horovod's
fusion threshold 64, one call for a framework that packs every gradient), so a step pays the
per-call latency k times: T_ar = Σ over its calls of the fastest algorithm's T.
Step time with compute T_c and overlap ω (share of compute that can hide communication):
  T(p) = T_c(p) + max(T_ar − ω·T_c(p),  T_ar(one bucket))
  ω = 2/3 by default: backward is about 2/3 of forward+backward (it computes gradients for
  activations and for weights, about twice forward's work), and a bucket's allreduce can start
  only once backward has produced its gradients; the last bucket has nothing left to hide
  behind, so its allreduce is always exposed. ω = 0 is no overlap (T = T_c + T_ar).
  Communication is assumed not to slow compute (NCCL kernels take some SMs; CPU ranks that
  progress MPI spend core time: measured CPU points include that, the model does not).
Stragglers: a synchronous step waits for the slowest of p ranks. With step times of relative
spread σ (Gaussian), the slowest is on average σ·m(p) above the mean, m(p) = E[max of p standard
normals] (computed exactly; m(p) ≤ √(2 ln p): 2.6 at 128, 3.0 at 512, 3.4 at 2048):
  T_c(p) ← T_c(p) · (1 + σ·(m(p) − m(q)))    q: the largest size whose straggling a measured
                                             contention limit L(q) already holds (else 1)
  σ: --jitter-cv; a study's measured spread (the median coefficient of variation of the 1-rank
  baseline's log windows within a run); else 1%, an estimate: Sinha et al. (SC'22, arXiv:2208.11035)
  find GPUs of one SKU in one cluster 8% apart on average; read as the range (max − min) over
  hundreds to thousands of GPUs, about 6–8σ of a Gaussian, that is σ ≈ 1%.
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
  (s: the serial fraction; 0 is perfect scaling; a fit of fewer than 3 sizes is not shown)
Measured links (benchmarks/bench_allreduce.py; --intra/--inter measured[:FILE[:BACKEND]] or FILE.json):
  each placement's median times t(S) fitted by least squares, weights 1/t², to the ring model
  over its n ranks, t(S) = 2(n−1)·α + 2(n−1)/n · S·β (the formula the predictions use).
  intra: the one-node fit (`fits`) at the largest rank count measured.
  inter: the fit across nodes (`inter_node_fits`) of N nodes × 1 rank: every ring step crosses
         the network, so α_e and β_e are the network's as an allreduce sees it, library and
         TCP/verbs overheads included (with K ranks a node: the flat ring's slowest hop).
  Assumed: that per-step cost holds at every node count (a non-blocking fabric: no congestion,
  no topology), for one rank's path through the node's NIC; --nics-per-node multiplies it as
  it does a preset. A measured link means --library mpi unless said otherwise.
Not modelled: congestion and topology of a real fabric (a fat tree with oversubscription, adaptive
routing), a framework's own per-step costs beyond T_c(1) (Horovod's negotiation of ready tensors
at rank 0 every cycle, op launch overheads), communication slowing compute, data loading, and
gradients produced unevenly over backward (VGG's fully connected layers, 89% of its bytes, come
first: the even rate makes such models look worse).
"""


@dataclass(frozen=True)
class Link:
    name: str
    alpha: float      # seconds per message step
    bandwidth: float  # bytes/s: the bus bandwidth an allreduce reaches on this link
    note: str = ""
    kind: str = ""    # nvlink | pci | net: NCCL's latency per hop for that kind replaces alpha under NCCL

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth


GB = 1e9

# Orders of magnitude to plan with; a measured fit (bench_allreduce) replaces them. Bandwidths are
# what an allreduce reaches (busbw), not line rates; α is a per-step latency (point-to-point
# latency plus the library's protocol overhead) as MPI pays it; under NCCL the hop latency of the
# link's kind (NCCL_HOP_LATENCY) applies instead.
PRESETS: dict[str, Link] = {
    "25GbE": Link("25GbE", 10e-6, 2.8 * GB, "25 Gb/s Ethernet (RoCE or TCP): 3.1 GB/s line, ~90% reached", "net"),
    "IB-100": Link("IB-100", 3e-6, 12 * GB, "100 Gb/s InfiniBand (EDR/HDR100): ~12 GB/s per NIC", "net"),
    "IB-200": Link("IB-200", 3e-6, 24 * GB, "200 Gb/s InfiniBand (HDR): ~24 GB/s per NIC", "net"),
    "IB-400": Link("IB-400", 3e-6, 48 * GB, "400 Gb/s InfiniBand (NDR): 46–49 GB/s per NIC measured", "net"),
    "NVLink": Link("NVLink", 1e-6, 370 * GB, "H100 NVLink/NVSwitch, 8 GPUs: ring busbw ~370 GB/s", "nvlink"),
    "PCIe3": Link("PCIe3", 2e-6, 12 * GB, "PCIe 3.0 x16: 15.75 GB/s line less packet overhead, ~12 GB/s "
                  "(an estimate)", "pci"),
    "PCIe4": Link("PCIe4", 2e-6, 24 * GB, "PCIe 4.0 x16: 31.5 GB/s line less packet overhead, ~24 GB/s "
                  "(an estimate)", "pci"),
}

# NCCL's own cost model (src/graph/tuning.cc, ncclTunerConstantsDefaults, Simple protocol: the one
# NCCL takes for the megabytes of a gradient bucket): latency per hop of a ring and of a tree by the
# link's kind, the base latency of a call, and the ring "plateau" factor for rings across nodes.
# These are NCCL 2.18's figures (v2.18.3-1; the "plateau effect of ring" of ncclTopoGetAlgoTime,
# 1.9 before Ampere, 1.4 from Ampere on, first appears in v2.7.3-1, 2020), the default for a
# prediction today. A published result run on an older NCCL takes that release's figures:
# NCCL_TUNING below.
NCCL_HOP_LATENCY = {"ring": {"nvlink": 3.4e-6, "pci": 5.7e-6, "net": 14e-6},
                    "tree": {"nvlink": 4.0e-6, "pci": 4.0e-6, "net": 14e-6}}
NCCL_CALL_LATENCY = 8.4e-6
NCCL_RING_PLATEAU = {"pre-ampere": 1.9, "ampere+": 1.4}

# NCCL's cost model by release, per protocol (LL: 8-byte lines of 4 data bytes and a flag, low latency;
# Simple: large chunks, full bandwidth). NCCL takes, per call, the protocol and algorithm its model
# finds fastest (ncclTopoGetAlgoTime: time = latency + bytes / bandwidth), so a small call goes by LL.
#   base:  baseLat (µs a call), by algorithm and protocol
#   hop:   hwLat (µs a step), by link kind, algorithm, protocol
#   split: whether a ring across nodes pays the intra-node hop latency on its intra-node steps
#          (v2.7.3-1 on: (nsteps − nInterSteps)·intraLat + nInterSteps·interLat) or the network's on
#          every step (v2.5.6-1: hw = NET for every step once nNodes > 1, latency nsteps·hwLat[NET])
#   plateau: the ring plateau factor applies (v2.7.3-1 on), or not (v2.5.6-1 has none)
#   ll_bw: LL's bandwidth as a share of Simple's ("busBw *= 1.0/4.0" for a ring, 1/3 for a tree)
# "2.18": the default table above with LL added (v2.18.3-1: ring LL base 6.6 µs, hop nvlink 0.6,
#         pci 1.0, net 2.7; tree LL base 6.8, hop 0.6, 1.0, 5.0).
# "2.5":  v2.5.6-1 (Nov 2019), the first src/graph/tuning.cc. The 2017–2018 papers ran NCCL 2.0–2.3,
#         which had no cost model at all (rings only; v2.3.5-5's common_coll.h picks LL below
#         nRanks × nRings × 8 KiB, a fixed threshold) and no trees (v2.4.2-1, Dec 2018); v2.5.6-1's
#         ring figures are the nearest NVIDIA wrote down for those ring kernels: Simple 6.6 µs a step
#         over the network, for every step of a ring that crosses nodes, base 8.4 µs, no plateau.
#         (v2.4.2-1's init.cu, its tree threshold, prices a ring at 6 µs × (nranks − 1) a call: the
#         same order.) Applying 2.18's 14 µs and ×1.9 to them instead doubles each call's latency.
NCCL_TUNING: dict[str, Any] = {
    "2.18": {"base": {"ring": {"LL": 6.6e-6, "Simple": NCCL_CALL_LATENCY},
                      "tree": {"LL": 6.8e-6, "Simple": NCCL_CALL_LATENCY}},
             "hop": {"ring": {"LL": {"nvlink": 0.6e-6, "pci": 1.0e-6, "net": 2.7e-6},
                              "Simple": NCCL_HOP_LATENCY["ring"]},
                     "tree": {"LL": {"nvlink": 0.6e-6, "pci": 1.0e-6, "net": 5.0e-6},
                              "Simple": NCCL_HOP_LATENCY["tree"]}},
             "split": True, "plateau": True, "ll_bw": {"ring": 1 / 4, "tree": 1 / 3.8}},
    "2.5": {"base": {"ring": {"LL": 3.6e-6, "Simple": 8.4e-6}, "tree": {"LL": 4.4e-6, "Simple": 0.0}},
            "hop": {"ring": {"LL": {"nvlink": 0.4e-6, "pci": 1.0e-6, "net": 0.9e-6},
                             "Simple": {"nvlink": 5.7e-6, "pci": 5.7e-6, "net": 6.6e-6}},
                    "tree": {"LL": {"nvlink": 0.5e-6, "pci": 1.0e-6, "net": 5.0e-6},
                             "Simple": {"nvlink": 28e-6, "pci": 28e-6, "net": 50e-6}}},
            "split": False, "plateau": False, "ll_bw": {"ring": 1 / 4, "tree": 1 / 3},
            "ll_threshold_per_rank": 256 * 32},
}
PROTOCOLS = ("LL", "Simple")
# tuning.cc's treeCorrectionFactor, Simple protocol, by ⌊log₂(bytes/64)⌋ (0 … 23; 1.0 beyond)
NCCL_TREE_CORRECTION = (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9,
                        .9, .9)

ALGORITHMS = ("ring", "tree", "hierarchical", "torus2d", "recursive_doubling", "rabenseifner")


@dataclass(frozen=True)
class Collective:
    """How a library runs an allreduce: which algorithms it may pick, per call, and what a call costs
    beyond the links (the α-β terms)."""

    library: str                       # nccl | mpi
    algorithms: tuple[str, ...]
    call_latency: float = 0.0          # s per call (NCCL's base latency; MPI's is in the fitted α)
    ring_plateau: float = 1.0          # multiplies the latency of a ring that crosses nodes
    pipelined: bool = False            # NCCL's ring pays each hop's latency once; MPI's waits per step
    nccl: str = "2.18"                 # which release's cost model (NCCL_TUNING)

    def hop(self, link: Link, algo: str = "ring", proto: str = "Simple") -> float:
        if self.library == "nccl" and link.kind in NCCL_HOP_LATENCY["ring"]:
            return NCCL_TUNING[self.nccl]["hop"]["tree" if algo == "tree" else "ring"][proto][link.kind]
        return link.alpha

    def protocols(self, *links: Link) -> tuple[str, ...]:
        """NCCL's protocols where its table prices every link (a kind); else Simple, at the given α."""
        if self.library == "nccl" and all(link.kind in NCCL_HOP_LATENCY["ring"] for link in links):
            return PROTOCOLS
        return ("Simple",)

    def base(self, algo: str, proto: str) -> float:
        if self.library != "nccl":
            return self.call_latency
        if proto == "Simple" and self.nccl == "2.18":
            return self.call_latency  # as before: 8.4 µs for every algorithm
        return NCCL_TUNING[self.nccl]["base"]["tree" if algo == "tree" else "ring"][proto]


def library(name: str, algorithms: Optional[Sequence[str]] = None, gpu: str = "ampere+",
            nccl: str = "2.18") -> Collective:
    """NCCL (ring and tree, NCCL ≥ 2.4) or MPI (ring, recursive doubling, Rabenseifner, hierarchical
    as Horovod's HOROVOD_HIERARCHICAL_ALLREDUCE runs it); `algorithms` narrows the choice to what a
    library version or a framework offered; `nccl`: which release's cost model (NCCL_TUNING)."""
    if nccl not in NCCL_TUNING:
        raise BadInput(f"nccl = {nccl!r}: one of {', '.join(NCCL_TUNING)}")
    if name == "nccl":
        plateau = NCCL_RING_PLATEAU[gpu] if NCCL_TUNING[nccl]["plateau"] else 1.0
        c = Collective("nccl", ("ring", "tree"), NCCL_CALL_LATENCY, plateau, True, nccl)
    elif name == "mpi":
        c = Collective("mpi", ("ring", "recursive_doubling", "rabenseifner"))
    else:
        raise BadInput(f"library = {name!r}: nccl or mpi")
    if algorithms:
        bad = [a for a in algorithms if a not in ALGORITHMS]
        if bad:
            raise BadInput(f"algorithms: {bad[0]!r} is not one of {', '.join(ALGORITHMS)}")
        c = Collective(c.library, tuple(algorithms), c.call_latency, c.ring_plateau, c.pipelined, c.nccl)
    return c


def _log2(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


def allreduce_cost(algo: str, nodes: int, per_node: int, nbytes: float, intra: Link, inter: Link,
                   coll: Collective, gamma: float = 0.0) -> float:
    """Seconds for one allreduce call of `nbytes` by `algo` over nodes × per_node ranks (FORMULAS):
    under NCCL, the faster of its protocols (LL, Simple) by its own cost model, as
    ncclTopoGetAlgoTime picks them."""
    if nodes * per_node <= 1:
        return 0.0
    protos = coll.protocols(intra, inter)
    rule = NCCL_TUNING[coll.nccl].get("ll_threshold_per_rank") if coll.library == "nccl" else None
    if rule and len(protos) > 1 and algo == "ring":
        # NCCL 2.3 (v2.3.5-5, include/common_coll.h, ncclGetCollResource) picks no protocol by time:
        # LL while nbytes ≤ nRanks × nRings × NCCL_LL_MAX_NTHREADS (256) × NCCL_THREAD_THRESHOLD (32 B);
        # nRings = 1 taken (the smallest threshold: a ring a NIC)
        protos = ("LL",) if nbytes <= nodes * per_node * rule else ("Simple",)
    return min(_allreduce_cost(algo, nodes, per_node, nbytes, intra, inter, coll, gamma, proto)
               for proto in protos)


def _allreduce_cost(algo: str, nodes: int, per_node: int, nbytes: float, intra: Link, inter: Link,
                    coll: Collective, gamma: float, proto: str) -> float:
    g, n = per_node, nodes
    p = n * g
    a_i, a_e = coll.hop(intra, algo, proto), coll.hop(inter, algo, proto)
    table = NCCL_TUNING[coll.nccl] if coll.library == "nccl" else None
    # LL moves 4 data bytes in each 8-byte line and NCCL's model gives it 1/4 of a ring's bandwidth
    # (1/3 or 1/3.8 of a tree's): tuning.cc, "busBw *= 1.0/4.0"
    slow = 1 / table["ll_bw"]["tree" if algo == "tree" else "ring"] if table and proto == "LL" else 1.0
    # the ring plateau (v2.7.3-1 on) multiplies a Simple ring's latency across nodes, not LL's
    plateau = coll.ring_plateau if n > 1 and proto == "Simple" else 1.0
    split = table["split"] if table else True

    def ring_lat(steps: int, inter_steps: int, spans_nodes: bool) -> float:
        """A ring's latency along its steps: v2.7.3-1 on, intra steps at the intra hop and
        inter steps at the network's; v2.5.6-1, every step at the network's once it crosses nodes."""
        if not spans_nodes:
            return steps * a_i
        if not split:
            return plateau * steps * a_e
        return plateau * ((steps - inter_steps) * a_i + inter_steps * a_e)

    reduce = (p - 1) / p * nbytes * gamma
    ring_bw = slow * 2 * (p - 1) * (nbytes / p) * (max(intra.beta, inter.beta) if n > 1 and g > 1
                                                   else inter.beta if n > 1 else intra.beta)
    calls = 1
    if algo == "ring":
        if not coll.pipelined:
            t = flat_ring_allreduce(n, g, nbytes, Link("", a_i, intra.bandwidth), Link("", a_e, inter.bandwidth))
        else:
            t = ring_lat(2 * (p - 1), 2 * (n - 1), n > 1) + ring_bw
    elif algo == "tree":
        k = int(math.log2(max(nbytes, 64) / 64))
        corr = NCCL_TREE_CORRECTION[k] if k < len(NCCL_TREE_CORRECTION) else 1.0
        t = 2 * ((g - 1) * a_i + int(math.log2(n)) * a_e) + ring_bw / (0.92 * corr)
    elif algo == "hierarchical":
        calls = 3 if g > 1 and n > 1 else 1  # reduce-scatter, allreduce between nodes, all-gather
        t = 0.0
        if g > 1:
            t += 2 * (g - 1) * a_i + slow * 2 * (g - 1) / g * nbytes * intra.beta
        if n > 1:  # N ranks, one a node: every step crosses the network
            t += ring_lat(2 * (n - 1), 2 * (n - 1), True) + slow * 2 * (n - 1) / n * nbytes * inter.beta
    elif algo == "torus2d":
        # rows of x ranks (whole nodes) × columns of y: reduce-scatter along rows, allreduce of
        # n/x bytes along columns, all-gather along rows (Mikami et al. 2018)
        x = torus_rows(p, g)
        y, nx = p // x, max(1, x // g)
        row_bw = slow * (x - 1) * (nbytes / x) * (max(intra.beta, inter.beta) if nx > 1 else intra.beta)
        t = 2 * (ring_lat(x - 1, nx - 1, nx > 1) + row_bw)
        if y > 1:  # a column's ranks sit on y different nodes; a node's g columns share its NICs
            t += ring_lat(2 * (y - 1), 2 * (y - 1), True) + \
                slow * 2 * (y - 1) / y * (nbytes / x) * min(g, x) * inter.beta
        calls = 3 if y > 1 and x > 1 else 1
    elif algo == "recursive_doubling":
        t = _log2(g) * (a_i + nbytes * intra.beta) + _log2(n) * (a_e + nbytes * inter.beta)
    elif algo == "rabenseifner":
        t = 2 * (_log2(g) * a_i + _log2(n) * a_e)
        t += (2 * (g - 1) / g * nbytes * intra.beta if g > 1 else 0.0) + \
            (2 * (n - 1) / n * nbytes * inter.beta if n > 1 else 0.0)
    else:
        raise BadInput(f"algorithm {algo!r} is not one of {', '.join(ALGORITHMS)}")
    return calls * coll.base(algo, proto) + t + reduce


def torus_rows(p: int, g: int) -> int:
    """The 2D torus's row length: the divisor of p nearest √p that is a whole number of nodes
    (rows and columns about equal make the fewest hops: an estimate of how the grid is cut)."""
    cands = [x for x in range(g, p + 1, g) if p % x == 0] or [p]
    return min(cands, key=lambda x: (abs(math.log(x / math.sqrt(p))), x))


def buckets(nbytes: float, bucket: float) -> list[float]:
    """The calls a step's gradients go out in: full buckets, then the rest."""
    if nbytes <= 0:
        return []
    k = max(1, math.ceil(nbytes / bucket - 1e-9))
    return [bucket] * (k - 1) + [nbytes - (k - 1) * bucket]


@functools.lru_cache(maxsize=None)
def expected_max_normal(p: int) -> float:
    """E[max of p independent standard normals], by quadrature (0 for p = 1; ≤ √(2 ln p))."""
    if p <= 1:
        return 0.0
    # E[max] = ∫ x · p·φ(x)·Φ(x)^(p−1) dx on a grid wide enough for p up to millions
    lo, hi, steps = -8.0, 8.0, 4000
    h = (hi - lo) / steps
    total = 0.0
    for i in range(steps + 1):
        x = lo + i * h
        phi = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        w = 0.5 if i in (0, steps) else 1.0
        total += w * x * p * phi * cdf ** (p - 1)
    return total * h


JITTER_CV = 0.01  # σ when nothing is measured: see FORMULAS (Sinha et al., SC'22), an estimate


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
                nic.bandwidth * nics_per_node, nic.note, nic.kind)


def comm_end(nbytes: float, window: float, cost, bucket: float, cycle: float = 0.0) -> tuple[float, list[float]]:
    """When a step's last allreduce ends, counted from the start of backward, and the calls made.

    Backward produces the gradients at an even rate over `window` seconds (ω·T_c; 0: all at once,
    when compute ends); calls run one after another (one communication stream). cycle = 0: a call
    starts when a full bucket is ready, the rest when backward ends (DDP's buckets); cycle > 0:
    every `cycle` seconds whatever is ready goes out in calls of at most `bucket` bytes (Horovod's
    tensor fusion), the next cycle starting when both the cycle time and the calls are done (an
    approximation of Horovod, which does not wait for its calls: see the comment below).
    `cost(n)`: seconds for one call of n bytes.
    """
    if nbytes <= 0:
        return 0.0, []

    def ready_at(b: float) -> float:  # when the first b bytes have been produced
        return window * min(1.0, b / nbytes)

    free, sent, sizes = 0.0, 0.0, []
    if cycle <= 0:
        for n in buckets(nbytes, bucket):
            free = max(free, ready_at(sent + n)) + cost(n)
            sent += n
            sizes.append(n)
        return free, sizes
    # Horovod 0.9.10–0.13 (tensorflow/mpi_ops.cc) does not wait for the calls: it enqueues them and
    # a finalizer thread waits. Ticking every 5 ms regardless, each cycle's bytes would be a call of
    # their own (~66 in ResNet-101's backward), each paying a ring's full latency (6.7 ms at 512 GPUs
    # by NCCL's v2.5.6-1 figures): 24 points below the published 90%. The real cycle is longer by
    # the coordinator's negotiation over all ranks (not modelled, no figure at hand), so the cycle
    # here waits for the calls, as before: an approximation, issue 24's open question.
    tick = min(cycle, window) if window > 0 else 0.0
    while sent < nbytes * (1 - 1e-12):
        ready = (nbytes if window <= 0 else nbytes * min(1.0, tick / window)) - sent
        free = max(free, tick)
        while ready > nbytes * 1e-12:
            n = min(ready, bucket)
            free += cost(n)
            sent, ready = sent + n, ready - n
            sizes.append(n)
        tick = max(tick + cycle, free) if window > 0 and tick < window else max(free, window)
    return free, sizes


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
    jitter_cv: float = 0.0           # σ: relative spread of a rank's step time (stragglers)

    def compute(self, p: int, per_node: int, stragglers: bool = True) -> float:
        if self.mode == "weak":
            if self.step_s is not None:
                t = self.step_s
            else:
                assert self.per_sample_s is not None  # predict's _check: one of the two is given
                t = self.fixed_s + self.batch * self.per_sample_s
        else:
            if self.per_sample_s is not None:
                per_sample, fixed = self.per_sample_s, self.fixed_s
            else:
                assert self.step_s is not None  # predict's _check: one of the two is given
                per_sample, fixed = self.step_s / self.batch, 0.0
            t = fixed + self.batch / p * per_sample
        t /= self.contention(min(p, per_node))
        return t * (1 + self.straggling(p)) if stragglers else t

    def contention(self, q: int) -> float:
        """L at the largest measured size ≤ q (1 when nothing was measured)."""
        if not self.limit:
            return 1.0
        known = [s for s in self.limit if s <= q]
        return self.limit[max(known)] if known else 1.0

    def straggling(self, p: int) -> float:
        """σ·(m(p) − m(q)): how much later than the mean the slowest of p ranks finishes, beyond what
        the measured limit at q ranks already holds."""
        if not self.jitter_cv or p <= 1:
            return 0.0
        q = max([s for s in (self.limit or {}) if s <= p], default=1)
        return self.jitter_cv * (expected_max_normal(p) - expected_max_normal(q))

    def samples(self, p: int) -> float:
        return p * self.batch if self.mode == "weak" else self.batch


@dataclass
class Machine:
    ranks_per_node: int
    intra: Link
    inter: Link  # the node's network: NICs per node already folded in (node_link)
    collective: Optional[Collective] = None  # default: NCCL, or MPI where a link was measured

    def coll(self) -> Collective:
        if self.collective is not None:
            return self.collective
        measured = any(link.name.startswith("measured") for link in (self.intra, self.inter))
        return library("mpi" if measured else "nccl")


def layout(p: int, ranks_per_node: int) -> tuple[int, int]:
    """(nodes, ranks per node) for p ranks: full nodes, or one partly filled node."""
    if p <= ranks_per_node:
        return 1, p
    if p % ranks_per_node:
        raise BadInput(f"size {p} is not a whole number of nodes of {ranks_per_node} ranks")
    return p // ranks_per_node, ranks_per_node


def _check(work: Workload) -> None:
    if work.step_s is None and work.per_sample_s is None:
        raise BadInput("predict: give the compute time per step" + (" at 1 rank" if work.mode == "strong" else "")
                       + ", or per sample")


def predict(work: Workload, machine: Machine, sizes: Sequence[int], overlap: float = 2 / 3,
            bucket_bytes: float = 25 * 2**20, gamma: float = 0.0, cycle_s: float = 0.0) -> list[dict]:
    """One row per size: compute, allreduce time per algorithm, step times, throughput and efficiency;
    `predicted` is what the library would run: per call, the fastest of its algorithms.

    T(p) = T_c(p) + max(0, end − ω·T_c(p)), `end` from comm_end: when the last call of the step's
    buckets ends, counted from the start of backward."""
    _check(work)
    g = machine.ranks_per_node
    coll = machine.coll()
    x1 = work.samples(1) / work.compute(1, g)
    rows = []
    for p in sizes:
        nodes, per_node = layout(p, g)
        tc = work.compute(p, per_node)
        row: dict[str, Any] = {"size": p, "nodes": nodes, "ranks_per_node": per_node, "compute_s": tc,
               "compute_no_stragglers_s": work.compute(p, per_node, stragglers=False),
               "library": coll.library, "algorithms": list(coll.algorithms)}

        def cost_of(algos):
            memo: dict = {}

            def cost(n: float) -> float:
                if n not in memo:
                    memo[n] = min(allreduce_cost(a, nodes, per_node, n, machine.intra, machine.inter, coll, gamma)
                                  for a in algos)
                return memo[n]
            return cost

        def timing(cost, w: float) -> dict:
            end, calls = comm_end(work.grad_bytes, w * tc, cost, bucket_bytes, cycle_s)
            t = tc + max(0.0, end - w * tc)
            x = work.samples(p) / t
            return {"step_s": t, "throughput": x, "efficiency": x / (p * x1), "comm_share": 1 - tc / t,
                    "calls": len(calls), "allreduce_s": sum(cost(n) for n in calls)}

        for a in ALGORITHMS:
            cost = cost_of((a,))
            row[f"{a}_no_overlap"] = timing(cost, 0.0)
            row[f"{a}_overlap"] = timing(cost, overlap)
            row[f"allreduce_{a}_s"] = row[f"{a}_no_overlap"]["allreduce_s"]
        cost = cost_of(coll.algorithms)
        row["predicted"] = timing(cost, overlap)
        row["predicted_no_overlap"] = timing(cost, 0.0)
        row["allreduce_s"] = row["predicted"]["allreduce_s"]
        row["calls"] = row["predicted"]["calls"]
        big = min(work.grad_bytes, bucket_bytes)
        row["best"] = min(coll.algorithms, key=lambda a: allreduce_cost(a, nodes, per_node, big, machine.intra,
                                                                        machine.inter, coll, gamma))
        rows.append(row)
    return rows


def predict_v1(work: Workload, machine: Machine, sizes: Sequence[int], overlap: float = 2 / 3,
               bucket_bytes: float = 25 * 2**20, gamma: float = 0.0) -> list[dict]:
    """The model before issue 24, kept to show what each term added: α-β only, latency paid once per
    step (one call of all S bytes), the better of a lockstep flat ring and hierarchical, no stragglers."""
    _check(work)
    g = machine.ranks_per_node
    x1 = work.samples(1) / work.compute(1, g, stragglers=False)
    rows = []
    for p in sizes:
        nodes, per_node = layout(p, g)
        tc = work.compute(p, per_node, stragglers=False)
        last = min(work.grad_bytes, bucket_bytes)
        best = None
        for f in (flat_ring_allreduce, hierarchical_allreduce):
            t = step_time(tc, f(nodes, per_node, work.grad_bytes, machine.intra, machine.inter, gamma),
                          f(nodes, per_node, last, machine.intra, machine.inter, gamma), overlap)
            best = t if best is None else min(best, t)
        assert best is not None  # two algorithms were tried
        x = work.samples(p) / best
        rows.append({"size": p, "step_s": best, "throughput": x, "efficiency": x / (p * x1)})
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


def serial_fractions(table: Sequence[dict], mode: str) -> dict:
    """Per backend, the serial fraction fitted to a study's speedups (Amdahl for strong scaling,
    Gustafson for weak), from its points on cores of their own: {backend: {law, serial_fraction,
    points}}. A backend measured at one size above 1 has no fit: two points are a line, not a law."""
    law, fit = ("amdahl", fit_amdahl) if mode == "strong" else ("gustafson", fit_gustafson)
    fits = {}
    for b in sorted({r["backend"] for r in table}):
        pts = [r for r in table if r["backend"] == b and r.get("speedup") and not r["oversubscribed"]]
        if len([r for r in pts if r["size"] > 1]) < 2:
            continue
        s = fit([r["size"] for r in pts], [r["speedup"] for r in pts])
        if s is not None:
            fits[b] = {"law": law, "serial_fraction": s, "points": len(pts)}
    return fits


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


def measured_jitter(doc: dict) -> Optional[float]:
    """σ of a study: the median, over the 1-rank baseline's runs (else the 1-rank runs of any backend),
    of the coefficient of variation of its log windows' step times within the run. No √window
    scaling: on shared machines slow drift, not step-to-step noise, dominates a window's spread."""
    runs = [r for r in doc.get("runs", []) if r.get("size") == 1 and len(r.get("windows") or []) > 2]
    base = [r for r in runs if r.get("backend") == BASELINE] or runs
    cvs = []
    for r in base:
        ts = [w["step_time"] for w in r["windows"] if w.get("step_time")]
        if len(ts) > 2 and statistics.mean(ts) > 0:
            cvs.append(statistics.stdev(ts) / statistics.mean(ts))
    return statistics.median(cvs) if cvs else None


def from_study(doc: dict, intra: Optional[str] = None, inter: Optional[str] = None,
               allreduce: Optional[Path] = None) -> tuple[Workload, Machine, dict]:
    """The model's inputs as a study measured them, and what was assumed (for the report).

    compute per step: the no-communication baseline at 1 rank (data + compute + optimizer),
    else the fastest backend at 1 rank less its sync; contention: the baseline's L(q) at the
    measured sizes that fit one node; gradient bytes: the model's trainable parameters ×
    bytes per parameter; links: the study's `predict` section unless given here; stragglers:
    predict.jitter_cv, else the spread of the 1-rank windows (measured_jitter), else JITTER_CV.
    """
    s, env = doc["study"], doc["environment"]
    pred = s.get("predict") or {}
    table = doc.get("table") or []
    at1 = {r["backend"]: r for r in table if r["size"] == 1}
    if BASELINE in at1:
        step_s, source = at1[BASELINE]["step_time"], "no-communication baseline at 1 rank"
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
             if r["backend"] == BASELINE and r.get("machine_limit") and not r["oversubscribed"] and r["size"] <= gpn}
    points = [pt for pt in doc.get("points", [])]
    batch = points[0]["batch_per_rank"] if s["mode"] == "weak" else points[0]["global_batch"]
    cv = pred.get("jitter_cv", "measured")
    measured_cv = measured_jitter(doc) if cv == "measured" else None
    jitter = float(cv) if cv != "measured" else (measured_cv if measured_cv is not None else JITTER_CV)
    jitter_source = ("predict.jitter_cv" if cv != "measured" else
                     "the spread of the 1-rank windows" if measured_cv is not None else "the default (no windows)")
    work = Workload(s["mode"], batch, params * pred.get("bytes_per_param", 4), step_s=step_s, limit=limit or None,
                    jitter_cv=jitter)

    def link(spec, where: str, between_nodes: bool) -> Link:
        if isinstance(spec, dict):
            return Link(f"α={spec['alpha_s']:g}s B={spec['bandwidth_GBps']:g}GB/s", spec["alpha_s"],
                        spec["bandwidth_GBps"] * GB)
        return parse_link(spec, where, allreduce, inter=between_nodes)

    machine = Machine(int(gpn), link(intra or pred.get("intra", "measured"), "predict.intra", False),
                      node_link(link(inter or pred.get("inter", "IB-100"), "predict.inter", True),
                                int(pred.get("nics_per_node", 1))))
    if pred.get("library"):
        machine.collective = library(pred["library"], pred.get("algorithms"))
    assumed = {"compute_source": source, "compute_s": step_s, "grad_params": params,
               "bytes_per_param": pred.get("bytes_per_param", 4), "grad_bytes": work.grad_bytes,
               "ranks_per_node": machine.ranks_per_node, "contention_limit": limit,
               "intra": link_dict(machine.intra), "inter": link_dict(machine.inter),
               "overlap": pred.get("overlap", 2 / 3), "bucket_mb": pred.get("bucket_mb", 25),
               "max_ranks": pred.get("max_ranks", 4096), "jitter_cv": jitter, "jitter_source": jitter_source,
               "library": machine.coll().library, "algorithms": list(machine.coll().algorithms)}
    return work, machine, assumed
