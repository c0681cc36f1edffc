"""Scaling studies: efficiency arithmetic, the performance model, a tiny real study end to end
(real mpirun ranks, the real trainer, bench_allreduce, matplotlib, headless Chromium), bad studies."""
from __future__ import annotations

import base64
import csv
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from chromium import find_chromium, render, setup_installs_chromium
from conftest import MPIRUN, ROOT, has_horovod, mpidl_cmd, run
from mpidl.errors import BadInput
from mpidl.scaling import efficiency, model
from mpidl.scaling.study import load_study
from mpidl.scaling.runner import aggregate, plan, windows

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_allreduce


# ---------------------------------------------------------------- arithmetic on known timings

def _point(x: float, t: float, over: bool = False, sync: float = 0.0) -> dict:
    one = lambda v: efficiency.spread([v])  # noqa: E731
    return {"throughput": one(x), "step_time": one(t), "oversubscribed": over,
            "breakdown": {"data": one(0.0), "compute": one(t - sync), "sync": one(sync), "optimizer": one(0.0)}}


def test_weak_efficiency_on_known_timings():
    # 64 samples per rank; X = p·64 / T
    pts = {("mpi", 1): _point(64 / 0.010, 0.010), ("mpi", 2): _point(128 / 0.0125, 0.0125, sync=0.0025),
           ("none", 1): _point(64 / 0.008, 0.008), ("none", 2): _point(128 / 0.010, 0.010)}
    rows = {(r["backend"], r["size"]): r for r in efficiency.table(pts, "weak", flag_below=0.7)}
    r = rows[("mpi", 2)]
    assert r["speedup"] == pytest.approx(1.6)
    assert r["efficiency"] == pytest.approx(0.8)                 # T(1)/T(p) = 10/12.5
    assert r["efficiency_from_times"] == pytest.approx(0.8)
    assert r["machine_limit"] == pytest.approx(0.8)              # baseline: 8/10
    assert r["efficiency_vs_lone_rank"] == pytest.approx(0.64)   # 10240 / (2 · 8000)
    assert r["of_limit"] == pytest.approx(0.8)                   # X/X₀ = T₀/T = 10/12.5
    assert r["comm_share"] == pytest.approx(0.2)                 # 1 − 10/12.5
    assert r["sync_share"] == pytest.approx(0.2)                 # 2.5/12.5
    assert r["karp_flatt"] == pytest.approx(0.25)                # (1/1.6 − 1/2)/(1 − 1/2)
    assert r["flagged"] is True and rows[("mpi", 1)]["flagged"] is False
    assert rows[("none", 2)]["of_limit"] == pytest.approx(1.0)


def test_strong_efficiency_on_known_timings():
    B = 128  # global; X = B / T
    pts = {("ddp", 1): _point(B / 0.020, 0.020), ("ddp", 4): _point(B / 0.008, 0.008)}
    r = {(r["backend"], r["size"]): r for r in efficiency.table(pts, "strong")}[("ddp", 4)]
    assert r["speedup"] == pytest.approx(2.5)
    assert r["efficiency"] == pytest.approx(0.625)               # T(1)/(p·T(p)) = 20/32
    assert r["efficiency_from_times"] == pytest.approx(0.625)
    assert "machine_limit" not in r                              # no baseline in this study


def test_goals_compare_with_ddp_and_the_baseline():
    pts = {("horovod", 1): _point(1000, 0.064), ("horovod", 2): _point(1900, 0.067),
           ("ddp", 1): _point(900, 0.071), ("ddp", 2): _point(1700, 0.075),
           ("none", 1): _point(1000, 0.064), ("none", 2): _point(1950, 0.066)}
    goals = efficiency.goals(efficiency.table(pts, "weak"), "weak")
    by = {(g["goal"], g["size"]): g for g in goals}
    assert by[("horovod E* ≥ ddp E*", 2)]["met"] and by[("horovod E ≥ ddp E", 2)]["met"]
    assert by[("horovod X / X₀ ≥ 0.95", 2)]["value"] == pytest.approx(1900 / 1950)
    pts[("horovod", 2)] = _point(1800, 0.071)
    by = {(g["goal"], g["size"]): g for g in efficiency.goals(efficiency.table(pts, "weak"), "weak")}
    assert not by[("horovod X / X₀ ≥ 0.95", 2)]["met"]          # 1800/1950 = 0.923
    assert efficiency.goals(efficiency.table(pts, "strong"), "strong") == []


def test_spread_and_aggregate_over_repetitions():
    s = efficiency.spread([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["rel_range"] == pytest.approx(9 / 2.5)
    runs = [{"backend": "mpi", "size": 2, "oversubscribed": False, "batch_per_rank": 8, "global_batch": 16,
             "throughput": x, "step_time": 16 / x, "breakdown": dict.fromkeys(efficiency.BUCKETS, 0.001),
             "breakdown_source": "test"} for x in (100.0, 300.0, 200.0)]
    runs.append({"backend": "mpi", "size": 2, "throughput": None, "error": "exit 1"})  # a failed run is left out
    runs.append({**runs[0], "nodes": 2, "throughput": 50.0})  # another placement: a point of its own
    pts = aggregate(runs)
    pt = pts[("mpi", 2, 1)]  # (backend, size, nodes); runs without a node count ran on one node
    assert pt["throughput"]["median"] == 200.0 and pt["throughput"]["n"] == 3
    assert pt["step_time"]["max"] == pytest.approx(0.16)
    assert pts[("mpi", 2, 2)]["throughput"]["median"] == 50.0 and pts[("mpi", 2, 2)]["ranks_per_node"] == 1


def test_plan_interleaves_sizes_and_backends():
    order = plan([1, 2, 4], ["mpi", "ddp", "none"], 2)
    assert len(order) == 18 and [p.order for p in order] == list(range(18))
    first, second = order[:9], order[9:]
    assert [p.size for p in first[::3]] == [1, 2, 4] and [p.size for p in second[::3]] == [4, 2, 1]
    assert [p.backend for p in first[:3]] == ["mpi", "ddp", "none"]
    assert [p.backend for p in second[:3]] == ["ddp", "none", "mpi"]
    assert {(p.size, p.backend) for p in first} == {(p.size, p.backend) for p in second}


def test_windows_after_warmup(tmp_path):
    recs = [{"step": 5, "step_time": 0.5, "samples_per_s": 10, "time": {"data": 1, "compute": 2, "sync": 3,
                                                                       "optimizer": 4}},
            {"step": 10, "step_time": 0.2, "samples_per_s": 20},
            {"step": 10, "epoch": 1.0, "val_loss": 1.0},           # an evaluation record: not a window
            {"step": 12, "step_time": 0.3, "samples_per_s": 15}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ws = windows(tmp_path / "metrics.jsonl", 5)
    assert [(w["start"], w["steps"]) for w in ws] == [(5, 5), (10, 2)]
    assert [w["samples_per_s"] for w in ws] == [20, 15]


# ---------------------------------------------------------------- the model

def test_ring_allreduce_by_hand():
    link = model.Link("t", 5e-6, 10e9)
    # 2(p−1)α + 2(p−1)/p·S·β with p = 4, S = 100 MB: 6·5 µs + 1.5·0.01 s
    assert model.ring_allreduce(4, 1e8, link) == pytest.approx(30e-6 + 0.015)
    assert model.ring_allreduce(1, 1e8, link) == 0.0
    assert model.ring_allreduce(2, 0, link) == pytest.approx(10e-6)  # latency alone
    # the reduction term (p−1)/p·S·γ
    assert model.ring_allreduce(4, 1e8, link, gamma=1e-10) == pytest.approx(30e-6 + 0.015 + 0.75e-2)


def test_hierarchical_and_flat_ring_by_hand():
    intra, inter = model.Link("i", 1e-6, 100e9), model.Link("e", 5e-6, 10e9)
    # 2 nodes × 4: intra 2·3·1 µs + 2·(3/4)·1e8/1e11; inter 2·1·5 µs + 2·(1/2)·1e8/1e10
    assert model.hierarchical_allreduce(2, 4, 1e8, intra, inter) == pytest.approx(6e-6 + 1.5e-3 + 10e-6 + 0.01)
    # flat ring over 8: 14 steps, each the slower hop: max(1 µs + 12.5 MB/100 GB/s, 5 µs + 12.5 MB/10 GB/s)
    assert model.flat_ring_allreduce(2, 4, 1e8, intra, inter) == pytest.approx(14 * (5e-6 + 1.25e-3))
    # one node: both are the intra ring
    assert model.hierarchical_allreduce(1, 4, 1e8, intra, inter) == pytest.approx(model.ring_allreduce(4, 1e8, intra))
    assert model.flat_ring_allreduce(1, 4, 1e8, intra, inter) == pytest.approx(model.ring_allreduce(4, 1e8, intra))
    assert model.node_link(inter, 4).bandwidth == 40e9


def test_step_time_overlap_and_prediction_by_hand():
    # overlap hides up to ω·T_c, but never the last bucket's allreduce (the closed form the model
    # before issue 24 used; predict_v1 keeps it for comparison)
    assert model.step_time(0.030, 0.015, 0.001, 2 / 3) == pytest.approx(0.031)
    assert model.step_time(0.030, 0.015, 0.001, 0.0) == pytest.approx(0.045)
    assert model.step_time(0.003, 0.015, 0.001, 2 / 3) == pytest.approx(0.003 + 0.013)
    # the model now: T = T_c + max(0, end − ω·T_c), `end` when the step's last call ends
    mpi = model.library("mpi", ["hierarchical"])
    intra, inter = model.Link("i", 1e-6, 100e9), model.Link("e", 5e-6, 10e9)
    work = model.Workload("weak", 32, 4e8, step_s=0.1)
    machine = model.Machine(8, intra, inter, mpi)
    row = {r["size"]: r for r in model.predict(work, machine, [1, 8, 16], overlap=0.5, bucket_bytes=1e8)}
    call = model.hierarchical_allreduce(2, 8, 1e8, intra, inter)  # MPI: the old formula, no call latency
    assert model.allreduce_cost("hierarchical", 2, 8, 1e8, intra, inter, mpi) == pytest.approx(call)
    # 4 buckets of 100 MB, ready at 12.5, 25, 37.5 and 50 ms of the 50 ms backward, sent one after another
    end = 0.0
    for k in range(1, 5):
        end = max(end, 0.0125 * k) + call
    assert row[16]["predicted"]["step_s"] == pytest.approx(0.1 + end - 0.05)
    assert row[16]["predicted"]["efficiency"] == pytest.approx(0.1 / (0.1 + end - 0.05))  # weak: T(1)/T(p)
    assert row[16]["predicted_no_overlap"]["step_s"] == pytest.approx(0.1 + 4 * call)
    assert row[16]["calls"] == 4 and row[16]["best"] == "hierarchical" and row[1]["predicted"]["efficiency"] == 1.0
    strong = model.Workload("strong", 256, 4e8, step_s=0.1)
    r = model.predict(strong, machine, [8], overlap=0.0)[0]
    assert r["compute_s"] == pytest.approx(0.1 / 8)
    with pytest.raises(model.BadInput):
        model.layout(12, 8)


def test_nccl_latency_terms_by_hand():
    nv, ib = model.PRESETS["NVLink"], model.PRESETS["IB-100"]
    nccl = model.library("nccl")  # Ampere and newer: ring plateau 1.4
    n = 64e6
    bw = 14 * (n / 8) / 12e9       # 2(p−1) chunks of n/p through the slower link, the network
    # ring of 2 nodes × 4: 14 hops, 2 of them between nodes; NCCL's hop latencies, not the presets' α
    hops = 12 * 3.4e-6 + 2 * 14e-6
    assert model.allreduce_cost("ring", 2, 4, n, nv, ib, nccl) == pytest.approx(8.4e-6 + 1.4 * hops + bw)
    # tree: 2((g−1)·intra + ⌊log₂N⌋·net) for latency; NCCL's tree bandwidth factors 0.92 and c(n)
    corr = model.NCCL_TREE_CORRECTION[int(math.log2(n / 64))]
    assert model.allreduce_cost("tree", 2, 4, n, nv, ib, nccl) == pytest.approx(
        8.4e-6 + 2 * (3 * 4e-6 + 14e-6) + bw / (0.92 * corr))
    # the ring's latency grows with p, the tree's with log N: at 512 nodes the tree is the cheaper small call
    assert model.allreduce_cost("tree", 512, 8, 1e5, nv, ib, nccl) < model.allreduce_cost("ring", 512, 8, 1e5, nv, ib,
                                                                                        nccl)
    pre = model.library("nccl", ["ring"], gpu="pre-ampere")
    assert pre.ring_plateau == 1.9 and pre.algorithms == ("ring",)
    # MPI: the preset's α, lockstep ring (every step waits for the network hop), no call latency
    mpi = model.library("mpi")
    assert model.allreduce_cost("ring", 2, 4, n, nv, ib, mpi) == pytest.approx(
        model.flat_ring_allreduce(2, 4, n, nv, ib))
    assert model.allreduce_cost("recursive_doubling", 4, 1, n, nv, ib, mpi) == pytest.approx(2 * (3e-6 + n / 12e9))
    assert model.allreduce_cost("rabenseifner", 4, 1, n, nv, ib, mpi) == pytest.approx(4 * 3e-6 + 1.5 * n / 12e9)
    # 2D torus of 16 nodes × 4: rows of 8 ranks (2 nodes), columns of 8
    assert model.torus_rows(64, 4) == 8
    with pytest.raises(model.BadInput, match="algorithms: 'butterfly'"):
        model.library("nccl", ["butterfly"])


def test_fusion_timeline_by_hand():
    cost = lambda n: 1e-3 + n / 1e9  # noqa: E731  1 ms a call + 1 GB/s
    # all at once (no overlap): 4 full buckets back to back
    assert model.comm_end(100e6, 0.0, cost, 25e6) == (pytest.approx(0.104), [25e6] * 4)
    # a bucket goes when it is full: ready at 50, 100, 150, 200 ms; each takes 26 ms
    assert model.comm_end(100e6, 0.2, cost, 25e6)[0] == pytest.approx(0.226)
    # Horovod's cycle: every 5 ms what is ready (2.5 MB) goes out, 3.5 ms a call; the last 5 ms ends at 203.5 ms
    end, sizes = model.comm_end(100e6, 0.2, cost, 64e6, cycle=0.005)
    assert end == pytest.approx(0.2035) and len(sizes) == 40 and sum(sizes) == pytest.approx(100e6)
    # slower calls than the cycle: each cycle takes what piled up meanwhile, so calls grow
    end, sizes = model.comm_end(100e6, 0.2, lambda n: 10e-3 + n / 1e9, 64e6, cycle=0.005)
    assert sizes[1] > sizes[0] and end > 0.2


def test_stragglers_take_the_slowest_of_p():
    assert model.expected_max_normal(1) == 0.0
    assert model.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-6)
    for p in (8, 128, 4096):  # √(2 ln p) bounds it from above
        assert model.expected_max_normal(p) < math.sqrt(2 * math.log(p))
    assert model.expected_max_normal(512) == pytest.approx(3.04, abs=0.01)
    work = model.Workload("weak", 32, 1e6, step_s=0.1, jitter_cv=0.02)
    assert work.compute(1, 8) == pytest.approx(0.1)
    assert work.compute(512, 8) == pytest.approx(0.1 * (1 + 0.02 * model.expected_max_normal(512)))
    # a measured contention limit at 2 ranks already holds their straggling: only the rest is added
    work = model.Workload("weak", 32, 1e6, step_s=0.1, jitter_cv=0.02, limit={2: 0.8})
    assert work.compute(16, 2) == pytest.approx(0.1 / 0.8 * (1 + 0.02 * (model.expected_max_normal(16)
                                                                         - model.expected_max_normal(2))))
    doc = {"runs": [{"size": 1, "backend": "none", "windows": [{"step_time": t} for t in (0.9, 1.0, 1.1)]},
                    {"size": 1, "backend": "mpi", "windows": [{"step_time": t} for t in (1.0, 2.0, 3.0)]}]}
    assert model.measured_jitter(doc) == pytest.approx(0.1)  # the baseline's windows, not mpi's


def test_contention_from_the_measured_limit():
    work = model.Workload("weak", 64, 1e6, step_s=0.02, limit={2: 0.8})
    assert work.compute(1, 2) == pytest.approx(0.02)
    assert work.compute(2, 2) == pytest.approx(0.025)
    assert work.compute(4096, 2) == pytest.approx(0.025)  # a full node costs the same, whatever the node count


@pytest.mark.parametrize("law,fit,curve", [("amdahl", model.fit_amdahl, model.amdahl),
                                           ("gustafson", model.fit_gustafson, model.gustafson)])
def test_scaling_law_fits_recover_the_serial_fraction(law, fit, curve):
    sizes = [1, 2, 4, 8, 16]
    assert fit(sizes, [curve(0.07, p) for p in sizes]) == pytest.approx(0.07)
    assert fit([1], [1.0]) is None
    assert fit(sizes, list(map(float, sizes))) == pytest.approx(0.0)  # perfect scaling: no serial part


def test_bench_allreduce_fit_recovers_alpha_beta():
    n, alpha, bw = 4, 7e-6, 5e9
    sizes = [2**k for k in range(12, 29)]
    times = [2 * (n - 1) * alpha + 2 * (n - 1) / n * s / bw for s in sizes]
    f = bench_allreduce.fit(sizes, times, n)
    assert f["alpha_s"] == pytest.approx(alpha, rel=1e-6) and f["bandwidth_GBps"] == pytest.approx(5.0, rel=1e-6)
    assert bench_allreduce.busbw(2**20, 1e-3, 2) == pytest.approx(2**20 / 1e-3 / 1e9)   # 2(n−1)/n = 1 at n = 2
    assert bench_allreduce.busbw(2**20, 1e-3, 8) == pytest.approx(2**20 / 1e-3 / 1e9 * 1.75)


def test_predict_cli_numbers_match_the_model():
    r = run(mpidl_cmd("scale", "predict", "--mode", "weak", "--batch", "64", "--step-time", "0.2", "--params",
                      "25e6", "--ranks-per-node", "8", "--intra", "NVLink", "--inter", "5e-6,12", "--sizes",
                      "8,64,4096", "--overlap", "0", "--json"))
    assert r.returncode == 0, r.output
    res = json.loads(r.stdout)
    rows = {row["size"]: row for row in res["rows"]}
    assert res["inputs"]["library"] == "nccl" and res["inputs"]["jitter_cv"] == model.JITTER_CV
    inter = model.Link("x", 5e-6, 12e9)  # given as numbers: its α is used, under NCCL too
    nccl = model.library("nccl")
    calls = model.buckets(1e8, 25 * 2**20)
    assert len(calls) == 4 and rows[64]["calls"] == 4
    t_ring = sum(model.allreduce_cost("ring", 8, 8, n, model.PRESETS["NVLink"], inter, nccl) for n in calls)
    assert rows[64]["allreduce_ring_s"] == pytest.approx(t_ring)
    tc = 0.2 * (1 + model.JITTER_CV * model.expected_max_normal(64))
    assert rows[64]["compute_s"] == pytest.approx(tc)
    assert rows[64]["ring_no_overlap"]["step_s"] == pytest.approx(tc + t_ring)
    assert rows[4096]["nodes"] == 512 and set(rows) == {8, 64, 4096}
    text = run(mpidl_cmd("scale", "predict", "--help")).stdout
    for term in ("2(p−1)·α + 2·(p−1)/p · S·β", "hierarchical", "Gustafson", "⌊log₂N⌋", "E[max of p standard",
                 "src/graph/tuning.cc", "Horovod's", "Not modelled"):
        assert term in text, term


def test_predict_reads_a_config_file(tmp_path):
    conf = tmp_path / "p.yaml"  # YAML reads 25.6e6 as a string: options convert as on the command line
    conf.write_text("mode: strong\nbatch: 1024\nstep_time: 0.8\nparams: 25.6e6\nranks_per_node: 8\n"
                    "intra: NVLink\ninter: IB-200\nnics_per_node: 4\nnodes: [1, 4]\n")
    r = run(mpidl_cmd("scale", "predict", "--config", str(conf), "--overlap", "0", "--json"))
    assert r.returncode == 0, r.output
    rows = {row["size"]: row for row in json.loads(r.stdout)["rows"]}
    assert set(rows) == {8, 32} and rows[32]["compute_no_stragglers_s"] == pytest.approx(0.8 / 32)
    assert rows[32]["compute_s"] == pytest.approx(0.8 / 32 * (1 + model.JITTER_CV * model.expected_max_normal(32)))
    inter = model.node_link(model.PRESETS["IB-200"], 4)
    assert inter.kind == "net" and inter.bandwidth == 96e9
    t = sum(model.allreduce_cost("hierarchical", 4, 8, n, model.PRESETS["NVLink"], inter, model.library("nccl"))
            for n in model.buckets(25.6e6 * 4, 25 * 2**20))
    assert rows[32]["allreduce_hierarchical_s"] == pytest.approx(t)
    conf.write_text("mode: weak\nbogus: 1\n")
    r = run(mpidl_cmd("scale", "predict", "--config", str(conf)))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {conf}: unknown key 'bogus'", r.output


@pytest.mark.parametrize("args,expect", [
    (["--mode", "weak", "--batch", "8", "--step-time", "0.1", "--params", "1e6", "--ranks-per-node", "8",
      "--sizes", "12"], "size 12 is not a whole number of nodes of 8 ranks"),
    (["--mode", "weak", "--batch", "8", "--step-time", "0.1", "--params", "1e6", "--ranks-per-node", "8",
      "--inter", "fast"], "--inter = 'fast'"),
    (["--mode", "weak", "--batch", "8", "--params", "1e6", "--ranks-per-node", "8"], "--step-time"),
])
def test_predict_bad_input_is_one_line(args, expect):
    r = run(mpidl_cmd("scale", "predict", *args))
    assert r.returncode == 2, r.output
    assert r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr


# ---------------------------------------------------------------- links measured across nodes

INTRA, INTER = (2e-6, 4e9), (60e-6, 1.25e9)   # (α s, bandwidth B/s): shared memory, the network


def _allreduce_json(path: Path, placements: str = "1x2,2x1") -> Path:
    """A bench_allreduce result, through its own summary and fits, of ring-model times with known links."""
    sizes = bench_allreduce.sizes_between(4096, 2**24)
    pls = bench_allreduce.parse_placements(placements)
    results = []
    for pl in pls:
        alpha, bw = INTRA if pl.nodes == 1 else INTER
        n = pl.ranks
        for s in sizes:
            t = 2 * (n - 1) * alpha + 2 * (n - 1) / n * s / bw
            results.append({"backend": "mpi", "placement": pl.label, "rep": 0, "bytes": s, "time_s": t,
                            "busbw_GBps": bench_allreduce.busbw(s, t, n)})
    figs = bench_allreduce.summarize(results, ["mpi"], pls, sizes)
    path.write_text(json.dumps({"machine": {"name": "test"}, **figs}))
    return path


def test_inter_node_fit_is_recorded_apart_from_the_intra_node_fit(tmp_path):
    doc = json.loads(_allreduce_json(tmp_path / "ar.json").read_text())
    assert set(doc["fits"]["mpi"]) == {"2"} and set(doc["inter_node_fits"]["mpi"]) == {"2x1"}
    f = doc["inter_node_fits"]["mpi"]["2x1"]
    assert (f["nodes"], f["ranks_per_node"]) == (2, 1)
    assert f["alpha_s"] == pytest.approx(INTER[0], rel=1e-6) and f["bandwidth_GBps"] == pytest.approx(1.25, rel=1e-6)
    assert doc["fits"]["mpi"]["2"]["bandwidth_GBps"] == pytest.approx(4.0, rel=1e-6)
    assert {(s["placement"], s["nodes"], s["per_node"]) for s in doc["summary"]} == {("1x2", 1, 2), ("2x1", 2, 1)}


def test_predict_takes_the_inter_node_link_from_the_benchmark(tmp_path):
    ar = _allreduce_json(tmp_path / "ar.json")
    r = run(mpidl_cmd("scale", "predict", "--mode", "weak", "--batch", "32", "--step-time", "0.1", "--params", "1e6",
                      "--ranks-per-node", "2", "--intra", f"measured:{ar}", "--inter", f"measured:{ar}",
                      "--sizes", "2,4", "--overlap", "0", "--json"))
    assert r.returncode == 0, r.output
    res = json.loads(r.stdout)
    assert res["inputs"]["inter_node"]["alpha"] == pytest.approx(60e-6)
    assert res["inputs"]["inter_node"]["bandwidth_GBps"] == pytest.approx(1.25)
    assert res["inputs"]["inter_node"]["name"] == "measured mpi 2 nodes × 1 (test)"
    rows = {row["size"]: row for row in res["rows"]}
    S = 4e6  # 1e6 fp32 gradients
    # one node of 2: the shared-memory ring, 2·1·2 µs + 2·(1/2)·S/4 GB/s
    assert rows[2]["allreduce_ring_s"] == pytest.approx(4e-6 + 1e-3)
    # 2 nodes × 2, hierarchical: that ring in each node, then 2·1·60 µs + 2·(1/2)·S/1.25 GB/s between them
    assert rows[4]["allreduce_hierarchical_s"] == pytest.approx(4e-6 + 1e-3 + 120e-6 + 3.2e-3)
    # flat ring over 4: 6 steps, each waits for the network hop, 60 µs + (S/4)/1.25 GB/s
    assert rows[4]["allreduce_ring_s"] == pytest.approx(6 * (60e-6 + S / 4 / 1.25e9))
    # a study's `predict.inter: measured` reads the study's allreduce.json alike
    doc = {"study": {"mode": "weak", "predict": {"inter": "measured", "ranks_per_node": 2}},
           "environment": {"cores": 2}, "model_inputs": {"grad_params": 1e6}, "points": [{"batch_per_rank": 32}],
           "table": [{"backend": "mpi", "size": 1, "step_time": 0.1, "sync": 0.0, "oversubscribed": False}]}
    _, machine, assumed = model.from_study(doc, allreduce=ar)
    assert (machine.inter.alpha, machine.inter.bandwidth) == pytest.approx(INTER)
    assert (machine.intra.alpha, machine.intra.bandwidth) == pytest.approx(INTRA)
    assert assumed["inter"]["name"].startswith("measured mpi 2 nodes × 1")


def test_predict_without_an_inter_node_fit_is_one_line(tmp_path):
    ar = _allreduce_json(tmp_path / "one-node.json", "1x2")
    r = run(mpidl_cmd("scale", "predict", "--mode", "weak", "--batch", "32", "--step-time", "0.1", "--params", "1e6",
                      "--ranks-per-node", "2", "--inter", f"measured:{ar}"))
    assert r.returncode == 2 and r.stdout == "", r.output
    assert r.stderr.splitlines() == [
        f"error: --inter = 'measured:{ar}': {ar}: no inter-node fit (inter_node_fits): bench_allreduce ran on one "
        "node only: measure across nodes (--placements 2x1 --hosts A,B), or give a preset or numbers"]
    doc = {"study": {"mode": "weak", "predict": {"inter": "measured"}}, "environment": {"cores": 2},
           "model_inputs": {"grad_params": 1e6}, "points": [{"batch_per_rank": 32}],
           "table": [{"backend": "mpi", "size": 1, "step_time": 0.1, "oversubscribed": False}]}
    with pytest.raises(model.BadInput, match=r"^predict.inter = 'measured': .*no inter-node fit"):
        model.from_study(doc, allreduce=ar)


def test_bench_allreduce_launch_commands():
    pl = bench_allreduce.Placement(2, 3)
    env = {"MPIDL_NET": "10.0.0.0/24", "PATH": "/bin"}
    cmd, e = bench_allreduce.launch_command("mpi", pl, bench_allreduce.Nodes("mpirun", ("a", "b", "c"), "agent x"),
                                            [4096, 8192], {"HOROVOD_CYCLE_TIME": "1"}, 2, env)
    worker = cmd[cmd.index(sys.executable):]
    assert cmd[:cmd.index(sys.executable)] == ["mpirun", "-H", "a:3,b:3", "-np", "6", "--mca", "plm_rsh_agent",
                                              "agent x", "-x", "HOROVOD_CYCLE_TIME", "-x", "MPIDL_NET", "-x",
                                              "OMP_NUM_THREADS"]
    assert worker[-4:] == ["--worker", "mpi", "--sizes", "4096,8192"]
    assert e["OMPI_MCA_oob_tcp_if_include"] == "10.0.0.0/24" and e["HOROVOD_CYCLE_TIME"] == "1"  # mpirun's own
    cmd, _ = bench_allreduce.launch_command("torch", pl, bench_allreduce.Nodes("srun"), [4096], {}, 2, env)
    assert cmd[:6] == ["srun", "-K", "-N", "2", "--ntasks-per-node=3", "--mpi=pmix"] and cmd[6] == sys.executable
    cmd, _ = bench_allreduce.launch_command("mpi", bench_allreduce.Placement(1, 4), bench_allreduce.Nodes(), [4096],
                                            {}, 2, {})
    assert cmd[:4] == ["mpirun", "-np", "4", "--oversubscribe"]


@pytest.mark.parametrize("args,expect", [
    (["--placements", "2x1"], "--placements: 2 nodes need hosts: give --hosts, run inside a SLURM allocation, "
                              "or use --launcher srun"),
    (["--placements", "2x1", "--hosts", "a"], "--placements: 2 nodes, but 1 host(s) from --hosts: a"),
    (["--placements", "1x2,2"], "--placements = '1x2,2': give NODESxRANKS_PER_NODE items"),
    (["--ranks", "2", "--launch-agent", "ssh"], "--launch-agent starts mpirun's daemons on --hosts"),
    (["--ranks", "2", "--mpi", "yield"], "--mpi = 'yield': give NAME:KEY=VALUE,KEY=VALUE"),
    (["--placements", "2x1", "--launcher", "srun", "--bind-to", "none"], "--bind-to none: mpirun's option"),
])
def test_bench_allreduce_bad_placement_is_one_line(args, expect):
    r = run([sys.executable, str(ROOT / "benchmarks" / "bench_allreduce.py"), *args, "--no-write"])
    assert r.returncode == 2 and r.stdout == "", r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and expect in r.stderr, r.stderr


# ---------------------------------------------------------------- a tiny real study, end to end

def _job(tmp: Path, rows: int = 2048) -> Path:
    job = {"name": "tiny", "seed": 0, "steps": 4,
           "data": {"files": str(tmp / "tiny.h5"), "batch": 16, "val_fraction": 0.0,
                    "synth": {"kind": "images", "rows": rows, "classes": 4, "channels": 3, "size": 8, "seed": 0}},
           "model": {"name": "small_cnn", "args": {"width": 8}},
           "optimizer": {"name": "sgd", "lr": 0.05}, "checkpoint": {"every_epochs": None}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _study(tmp: Path, job: Path, **over) -> Path:
    study = {"name": "tiny", "job": str(job), "mode": "weak", "sizes": [1, 2], "warmup_steps": 2, "steps": 4,
             "window": 2, "repetitions": 1, "backends": ["mpi", "ddp"], "output": str(tmp / "out"),
             "timeout_s": 600}
    study.update(over)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    if MPIRUN is None:
        pytest.skip("mpirun not installed")
    tmp = tmp_path_factory.mktemp("study")
    backends = "mpi,horovod,torch" if has_horovod() else "mpi,torch"
    ar = run([sys.executable, str(ROOT / "benchmarks" / "bench_allreduce.py"), "--ranks", "2", "--repeats", "1",
              "--max-bytes", "1M", "--backends", backends, "--json", str(tmp / "allreduce.json")], timeout=600)
    assert ar.returncode == 0, ar.output[-3000:]
    study = _study(tmp, _job(tmp), allreduce=str(tmp / "allreduce.json"))
    r = run(mpidl_cmd("scale", str(study)), timeout=1200)
    assert r.returncode == 0, r.output[-4000:]
    rep = run(mpidl_cmd("report", str(tmp / "out")), timeout=300)
    assert rep.returncode == 0, rep.output[-3000:]
    return tmp / "out", r.stdout


@pytest.mark.timeout(1800)  # the module's study runs in the first test that asks for it
def test_tiny_study_json_matches_the_runs(tiny_study):
    out, stdout = tiny_study
    doc = json.loads((out / "study.json").read_text())
    assert doc["complete"] and doc["failed_runs"] == 0
    assert len(doc["runs"]) == 6 and len([ln for ln in stdout.splitlines() if ln.startswith("[")]) == 6
    assert {(r["backend"], r["size"]) for r in doc["runs"]} == {(b, p) for b in ("mpi", "ddp", "none") for p in (1, 2)}
    for r in doc["runs"]:
        recs = [json.loads(ln) for ln in (out / r["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        measured = [x for x in recs if "step_time" in x and x["step"] > 2]  # windows of 2 after 2 warm-up steps
        assert len(measured) == 2
        assert r["throughput"] == pytest.approx(statistics.median(x["samples_per_s"] for x in measured))
        assert r["step_time"] == pytest.approx(statistics.median(x["step_time"] for x in measured))
        assert r["breakdown"]["sync"] == pytest.approx(statistics.median(x["time"]["sync"] for x in measured))
        assert r["global_batch"] == 16 * r["size"] and not (out / r["run_dir"] / "checkpoints").exists()
    env = doc["environment"]
    for key in ("cpu_model", "cores", "torch", "mpi", "commit", "launcher"):
        assert env.get(key), key
    assert env["tuning_env"]["OMPI_MCA_btl_vader_single_copy_mechanism"] == "none"  # conftest's, as the ranks saw it
    assert doc["model_inputs"]["grad_params"] == 8 * 3 * 9 + 8 + 16 + 16 * 8 * 9 + 16 + 32 + 16 * 4 + 4
    table = {(r["backend"], r["size"]): r for r in doc["table"]}
    for b in ("mpi", "ddp"):
        x1, x2 = table[(b, 1)]["throughput"], table[(b, 2)]["throughput"]
        assert table[(b, 2)]["efficiency"] == pytest.approx(x2 / (2 * x1))
        assert table[(b, 2)]["of_limit"] == pytest.approx(x2 / table[("none", 2)]["throughput"])
    assert table[("none", 2)]["machine_limit"] == pytest.approx(
        table[("none", 2)]["throughput"] / (2 * table[("none", 1)]["throughput"]))


@pytest.mark.timeout(1800)
def test_tiny_study_report_files_match(tiny_study):
    out, _ = tiny_study
    doc = json.loads((out / "study.json").read_text())
    pngs = ["summary.png", "throughput.png", "efficiency.png", "breakdown.png", "allreduce.png", "prediction.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with open(out / "points.csv") as f:
        rows = {(r["backend"], int(r["size"])): r for r in csv.DictReader(f)}
    for r in doc["table"]:
        c = rows[(r["backend"], r["size"])]
        assert float(c["throughput"]) == pytest.approx(r["throughput"])
        assert float(c["efficiency"]) == pytest.approx(r["efficiency"])
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == len(doc["runs"])
    page = (out / "report.html").read_text()
    for name in pngs:  # embedded, byte for byte: the page needs no other file
        assert base64.b64encode((out / name).read_bytes()).decode() in page, name
    assert "src=\"http" not in page and "<link" not in page
    mpi2 = next(r for r in doc["table"] if (r["backend"], r["size"]) == ("mpi", 2))
    assert f"{mpi2['throughput']:,.0f}" in page and "X(p) / (p · X(1))" in page
    md = (out / "report.md").read_text()
    assert all(f"]({name})" in md for name in pngs)
    pred = json.loads((out / "prediction.json").read_text())
    assert pred["rows"][-1]["size"] == 4096 and pred["assumed"]["intra"]["name"].startswith("measured mpi")
    ar = json.loads((out / "allreduce.json").read_text())
    assert pred["assumed"]["intra"]["alpha"] == pytest.approx(ar["fits"]["mpi"]["2"]["alpha_s"])
    for s in ar["summary"]:
        assert s["busbw_GBps"] == pytest.approx(s["bytes"] / s["time_s"] / 1e9)  # n = 2: busbw = algbw


@pytest.mark.timeout(1800)
def test_report_renders_in_headless_chromium(tiny_study, tmp_path):
    browser = find_chromium()
    if browser is None and setup_installs_chromium():
        pytest.fail("chromium is missing, yet scripts/setup.sh installs it on this machine: run `make setup`")
    if browser is None:
        pytest.skip("chromium not installed, and scripts/setup.sh cannot install it here (it does as root with "
                    "apt on Debian)")
    out, _ = tiny_study
    res = render(out / "report.html", tmp_path, browser)
    assert res["images"] == 6 and res["rendered"] == 6, res
    assert all(w > 100 and h > 100 for w, h in res["sizes"]), res["sizes"]
    assert res["problems"] == [] and res["console"] == [], res
    # the check itself can fail: a broken image and a script error are caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head></head><body><img src='data:image/png;base64,AAAA'>"
                   "<script>console.error('boom'); undefinedFunction();</script></body></html>")
    res = render(bad, tmp_path, browser)
    assert res["images"] == 1 and res["rendered"] == 0
    assert any("boom" in p for p in res["problems"]) and res["console"], res


# ---------------------------------------------------------------- bad studies: one line, exit 2, nothing written

def _refused(tmp: Path, study: Path, expect: str, env: dict | None = None, started: bool = False) -> None:
    r = run(mpidl_cmd("scale", str(study)), env=env, timeout=300)
    assert r.returncode == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert expect in r.stderr, r.stderr
    # refused by the checks: nothing printed; by the trainer: the study's first line only
    assert (r.stdout.startswith("study ") and r.stdout.count("\n") == 1) if started else r.stdout == "", r.stdout
    assert not (tmp / "out").exists()


def test_dry_run_checks_every_placement_and_runs_nothing(tmp_path):
    study = _study(tmp_path, _job(tmp_path), sizes=[1, 2, 3], global_batch=None)
    r = run(mpidl_cmd("scale", str(study), "--dry-run"), timeout=300)
    assert r.returncode == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("study tiny: 3 placement(s) checked by mpirun, nothing run"), r.stdout
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == [f"{p} rank(s) on 1 node(s)" for p in (1, 2, 3)]
    assert "mpirun -np 3 " in lines[3] and "train" in lines[3]
    assert not (tmp_path / "out").exists()
    # the checks still refuse what cannot run: one line, exit 2
    r = run(mpidl_cmd("scale", str(_study(tmp_path, _job(tmp_path, rows=20))), "--dry-run"), timeout=300)
    assert r.returncode == 2 and "2 ranks need 32 samples per step" in r.stderr, r.output
    assert not (tmp_path / "out").exists()


def test_unknown_key_is_refused(tmp_path):
    study = _study(tmp_path, _job(tmp_path), sizez=[1, 2])
    _refused(tmp_path, study, f"{study}: unknown key 'sizez'")


@pytest.mark.parametrize("over,expect", [
    ({"timeout_s": float("inf")}, "timeout_s = .inf: Input should be a finite number"),
    ({"flag_below": float("nan")}, "flag_below = .nan: Input should be a finite number"),
    ({"predict": {"bucket_mb": float("inf")}}, "predict.bucket_mb = .inf: Input should be a finite number"),
])
def test_non_finite_floats_are_refused(tmp_path, over, expect):
    study = _study(tmp_path, _job(tmp_path), **over)
    with pytest.raises(BadInput) as e:
        load_study(study)
    assert str(e.value).startswith(f"{study}: ") and expect in str(e.value), str(e.value)


@pytest.mark.parametrize("over,expect", [
    ({"name": "a/b"}, 'name = "a/b": a name is one folder name'),
    ({"output": "{0}"}, 'output = "{0}": the only placeholder is {name}'),
    ({"output": "runs/%x-{name}"}, 'output = "runs/%x-{name}": % is refused'),
])
def test_name_and_output_are_checked_as_a_jobs(tmp_path, over, expect):
    study = _study(tmp_path, _job(tmp_path), **over)
    with pytest.raises(BadInput) as e:
        load_study(study)
    assert str(e.value).startswith(f"{study}: {expect}"), str(e.value)


def test_size_larger_than_the_data_is_refused(tmp_path):
    study = _study(tmp_path, _job(tmp_path, rows=256), sizes=[1, 2, 32])
    _refused(tmp_path, study, f"{study}: sizes: 32 ranks need 512 samples per step (32 × batch 16), more than the 256")


def test_strong_size_that_does_not_divide_is_refused(tmp_path):
    study = _study(tmp_path, _job(tmp_path), mode="strong", global_batch=64, sizes=[1, 2, 3])
    _refused(tmp_path, study, "global_batch = 64 does not divide by 3 ranks")


def test_backend_not_installed_is_refused(tmp_path):
    # Horovod cannot be uninstalled for one test: a package that fails to import shadows it.
    shadow = tmp_path / "shadow" / "horovod"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named horovod.torch')\n")
    study = _study(tmp_path, _job(tmp_path), backends=["mpi", "horovod"])
    _refused(tmp_path, study, "backends: horovod is not installed here (ImportError: No module named horovod.torch)",
             env={"PYTHONPATH": f"{shadow.parent}:{ROOT}"})


def test_bad_value_in_the_job_overrides_is_refused(tmp_path):
    study = _study(tmp_path, _job(tmp_path), set=["optimizer.lr=-1"])
    _refused(tmp_path, study, "optimizer.lr = -1")


@pytest.mark.mpi  # its child starts mpirun
def test_job_the_trainer_refuses_is_refused(tmp_path):
    # passes the study's own checks; the trainer finds the crop larger than the 8×8 images
    study = _study(tmp_path, _job(tmp_path), set=["data.preprocess.crop=64"], backends=["mpi"], baseline=False)
    _refused(tmp_path, study, f"{study}: run p1-mpi-r0: the trainer refused the job: crop size 64 is larger than",
             started=True)


@pytest.mark.mpi  # its child starts mpirun
def test_a_study_whose_first_runs_all_fail_stops(tmp_path):
    # a broken set-up (here the launcher's arguments): exit 1 after one round, not a study of failures
    study = _study(tmp_path, _job(tmp_path), launcher={"args": ["--no-such-mpirun-option"]}, backends=["mpi"])
    r = run(mpidl_cmd("scale", str(study)), timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.output
    assert "the first 2 runs all failed, so the study stops" in r.stderr and "--no-such-mpirun-option" in r.stderr
    doc = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [(x["backend"], x["size"]) for x in doc["runs"]] == [("mpi", 1), ("none", 1)] and not doc["complete"]


def test_report_of_a_folder_without_a_study(tmp_path):
    r = run(mpidl_cmd("report", str(tmp_path)))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no study here" in r.stderr, r.output


# ---------------------------------------------------------------- the no-communication baseline backend

def _losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"step_time"' in ln]


def test_backend_none_does_the_same_work_without_averaging(tmp_path):
    """At 1 rank `none` is the mpi backend's run exactly; at 2 ranks its ranks keep their own gradients."""
    from conftest import cli_in_turn

    job = {"name": "n", "seed": 1, "steps": 12, "log_every": 1,
           "data": {"files": str(tmp_path / "tab.h5"), "batch": 16, "val_fraction": 0.0,
                    "synth": {"kind": "tabular", "rows": 1024, "features": 8, "classes": 3}},
           "model": {"name": "mlp", "args": {"hidden": [16], "num_classes": 3}},
           "optimizer": {"name": "sgd", "lr": 0.1}, "checkpoint": {"every_epochs": None}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    curves = {}
    for np_ in (1, 2):  # both backends in turn, by one launch of each size
        r = cli_in_turn(np_, [["train", str(path), "--set", f"backend={backend}", "--set",
                               f"output={tmp_path / f'run-{np_}-{backend}'}"] for backend in ("mpi", "none")])
        assert r.output.count("ranks do not average gradients") == (np_ == 2)  # said by none, on 2 ranks
        for backend in ("mpi", "none"):
            out = tmp_path / f"run-{np_}-{backend}"
            curves[(np_, backend)] = _losses(out)
            assert json.loads((out / "summary.json").read_text())["backend"] == backend
    assert curves[(1, "none")] == curves[(1, "mpi")]
    assert curves[(2, "none")][0] == curves[(2, "mpi")][0]  # the same start: step 1 is before any update
    assert curves[(2, "none")][-1] != pytest.approx(curves[(2, "mpi")][-1], rel=1e-6)  # then apart


def test_backend_none_window_time_is_the_slowest_ranks():
    from conftest import mpirun, pycode

    code = """
import json
import mpidl
from mpidl.train.backends import make_backend
world = mpidl.init()
b = make_backend("none", world, {})
out = b.average({"time": 1.0 + world.rank, "loss": float(world.rank), "compute": 0.1 * (world.rank + 1)})
rows = world.comm.gather([world.rank, out["time"], out["loss"], round(out["compute"], 6)], root=0)
if world.rank == 0:  # one print: ranks printing at once can interleave their lines
    print("RESULT", json.dumps(rows), flush=True)
"""
    r = mpirun(2, pycode(code), timeout=120)
    assert r.returncode == 0, r.output
    results = [json.loads(line.split(" ", 1)[1]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == [[[0, 2.0, 0.5, 0.15], [1, 2.0, 0.5, 0.15]]]
