"""`mpidl scale STUDY.yaml`, `mpidl scale predict ...` and `mpidl report STUDY_DIR`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from mpidl.errors import BadInput

SCALE_HELP = """\
Run a scaling study: every (size, backend, repetition) is a real `mpidl train` under the
launcher, plus the no-communication baseline (backend none) at every size. Writes
<output>/study.json and the runs; `mpidl report <output>` turns them into plots and a page.
With `launcher: {name: slurm, nodes: [1, 2]}` every run is one SLURM job (`mpidl submit
--wait`), and each size runs at every node count that divides it.

  mpidl scale STUDY.yaml [--force]     run it (--force replaces a study already in <output>)
  mpidl scale STUDY.yaml --dry-run     check every point and print how each would start; run nothing
  mpidl scale predict [options]        the performance model (mpidl scale predict --help)

Study keys: name, job, set, mode (strong|weak), sizes, batch_per_rank (weak) or global_batch
(strong), warmup_steps, steps, window, repetitions, backends, baseline, threads_per_rank,
launcher {name: mpirun|slurm, args (mpirun), nodes, partition (slurm)}, timeout_s, output,
allreduce, flag_below, predict {...}, report {samples|epochs, samples_per_epoch, target}.
See mpidl/scaling/study.py and benchmarks/studies/*.yaml.
"""


def _predict_parser() -> argparse.ArgumentParser:
    from mpidl.scaling import model

    presets = "\n".join(f"  {k:<8} α = {v.alpha * 1e6:g} µs, B = {v.bandwidth / 1e9:g} GB/s: {v.note}"
                        for k, v in model.PRESETS.items())
    p = argparse.ArgumentParser(
        prog="mpidl scale predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict step time, throughput and efficiency at sizes not measured "
                    "(ring and hierarchical allreduce, with and without overlap).",
        epilog="The model:\n" + model.FORMULAS + "\nLink presets (--intra/--inter):\n" + presets
        + "\n  measured:FILE[:BACKEND]  the α/β fit of benchmarks/bench_allreduce.py (default backend mpi):"
        + "\n                           --intra its one-node fit, --inter its fit across nodes; FILE.json alike"
        + "\n  ALPHA_S,BANDWIDTH_GBPS   numbers, e.g. 5e-6,12\n")
    p.add_argument("--study", metavar="DIR", help="take compute time, gradient size, links and measured points from "
                                                  "a study (explicit options below override)")
    p.add_argument("--config", metavar="FILE", help="YAML/JSON with any of these options (keys with underscores)")
    p.add_argument("--mode", choices=("weak", "strong"))
    p.add_argument("--batch", type=int, help="weak: samples per rank per step; strong: global samples per step")
    p.add_argument("--step-time", type=float, metavar="S",
                   help="compute time per step in seconds (weak: at the per-rank batch; strong: at 1 rank)")
    p.add_argument("--per-sample", type=float, metavar="S", help="compute seconds per sample (with --fixed)")
    p.add_argument("--fixed", type=float, default=None, metavar="S", help="compute seconds per step, any batch")
    p.add_argument("--params", type=float, help="gradient parameters allreduced per step")
    p.add_argument("--bytes-per-param", type=int, help="4 (fp32 gradients) or 2 (fp16/bf16); default 4")
    p.add_argument("--grad-bytes", type=float, help="bytes allreduced per step (instead of --params)")
    p.add_argument("--ranks-per-node", type=int, help="GPUs (or CPU ranks) per node, g")
    p.add_argument("--nodes", help="node counts to predict, e.g. 1,2,4,8 (sizes = nodes × g)")
    p.add_argument("--sizes", help="total sizes to predict, e.g. 8,64,512 (multiples of g above g)")
    p.add_argument("--max-ranks", type=int, help="default sizes: powers of two up to this (default 4096)")
    p.add_argument("--intra", help="link inside a node (default: measured, else NVLink)")
    p.add_argument("--inter", help="network between nodes, per NIC (default IB-100); measured:FILE: "
                                        "bench_allreduce's fit across nodes")
    p.add_argument("--nics-per-node", type=int, help="NICs per node (the node's bandwidth = NICs × NIC)")
    p.add_argument("--overlap", type=float, help="ω, share of compute that can hide communication (default 2/3)")
    p.add_argument("--bucket-mb", type=float, help="the last gradient bucket, always exposed (default 25)")
    p.add_argument("--gamma", type=float, help="reduction seconds per byte (default 0)")
    p.add_argument("--cycle-ms", type=float, help="tensor fusion's cycle (Horovod: what is ready goes out every "
                                                  "cycle, up to --bucket-mb); default 0: a call per full bucket (DDP)")
    p.add_argument("--library", choices=("nccl", "mpi"),
                   help="whose algorithms and per-call costs: nccl (ring, tree; GPUs) or mpi (ring, recursive "
                        "doubling, Rabenseifner; CPU ranks). Default: mpi where a link is measured, else nccl")
    p.add_argument("--algorithms", help="narrow the library's choice, e.g. ring or ring,tree; also hierarchical, "
                                        "torus2d (one of them per call, the fastest)")
    p.add_argument("--jitter-cv", type=float, metavar="SIGMA",
                   help=f"relative spread of a rank's step time, for stragglers (default: a study's measured "
                        f"spread, else {model.JITTER_CV:g})")
    p.add_argument("--published", nargs="+", metavar="FILE|DIR",
                   help="hold the model against published results (benchmarks/published/*.yaml): row by row, "
                        "with what each term adds; no other option applies")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpidl scale", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=SCALE_HELP)
    p.add_argument("--force", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    return p


def cmd_scale(args: argparse.Namespace) -> int:
    if args.study == "predict":
        a = _predict_parser().parse_args(args.rest)
        return cmd_published(a) if a.published else cmd_predict(a)
    extra = _run_parser().parse_args(args.rest)
    from mpidl.scaling.runner import StudyFailed, run_study
    from mpidl.scaling.study import load_study

    study = load_study(args.study)
    try:
        doc = run_study(study, force=args.force or extra.force, echo=lambda s: print(s, flush=True),
                        dry_run=args.dry_run or extra.dry_run)
    except StudyFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if doc.get("dry_run"):
        return 0
    out = study.output
    print(f"wrote {out / 'study.json'}; next: mpidl report {out}")
    if doc["failed_runs"]:
        print(f"{doc['failed_runs']} run(s) failed: see their output.log under {out / 'runs'}", file=sys.stderr)
        return 1
    return 0


def _split(text: Optional[str], where: str) -> Optional[list[int]]:
    if not text:
        return None
    try:
        vals = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise BadInput(f"{where} = {text!r}: give whole numbers separated by commas") from None
    if not vals or any(v < 1 for v in vals):
        raise BadInput(f"{where} = {text!r}: sizes are >= 1")
    return vals


def predict_inputs(a: argparse.Namespace) -> dict:
    """Resolve options (study, then config file, then command line) into the model's inputs."""
    from mpidl.scaling import model

    if a.config:
        import yaml

        try:
            conf = yaml.safe_load(Path(a.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise BadInput(f"{a.config}: cannot read the predict config ({e})") from None
        if not isinstance(conf, dict):
            raise BadInput(f"{a.config}: a mapping of option names is expected")
        actions = {act.dest: act for act in _predict_parser()._actions}
        for k, v in conf.items():
            if k not in actions or k in ("config", "json", "help", "study"):
                raise BadInput(f"{a.config}: unknown key '{k}'")
            if isinstance(v, list):
                v = ",".join(map(str, v))
            convert = actions[k].type
            assert not isinstance(convert, (str, argparse.FileType))  # the parser's types are functions
            if convert is not None:
                try:
                    v = convert(v)
                except (TypeError, ValueError):
                    raise BadInput(f"{a.config}: {k} = {v!r}: expected a {convert.__name__}") from None
            elif v is not None:
                v = str(v)
            if getattr(a, k) is None:
                setattr(a, k, v)
    study_doc = None
    if a.study:
        path = Path(a.study) / "study.json"
        try:
            from mpidl.scaling.efficiency import on_one_node

            study_doc = on_one_node(json.loads(path.read_text()))  # the model's node: the one-node points
        except FileNotFoundError:
            raise BadInput(f"{path}: no study here (run mpidl scale STUDY.yaml first)") from None
        except (OSError, ValueError) as e:
            raise BadInput(f"{path}: unreadable study ({e})") from None
    measured_file = (Path(a.study) / "allreduce.json" if a.study and (Path(a.study) / "allreduce.json").exists()
                     else None)
    work: Optional[model.Workload]
    machine: Optional[model.Machine]
    if study_doc is not None:
        work, machine, assumed = model.from_study(study_doc, a.intra, a.inter, measured_file)
        pred = study_doc["study"].get("predict") or {}
    else:
        work = machine = None
        assumed, pred = {}, {}
    mode = a.mode or (work.mode if work else None)
    if mode is None:
        raise BadInput("predict: --mode weak|strong (or --study DIR) is required")
    batch = a.batch or (work.batch if work else None)
    if not batch or batch < 1:
        raise BadInput("predict: --batch (weak: per rank; strong: global) is required")
    bpp = a.bytes_per_param or pred.get("bytes_per_param", 4)
    if a.grad_bytes is not None:
        grad = a.grad_bytes
    elif a.params is not None:
        grad = a.params * bpp
    elif work is not None:
        grad = work.grad_bytes
    else:
        raise BadInput("predict: give --params (with --bytes-per-param) or --grad-bytes")
    step = a.step_time if a.step_time is not None else (work.step_s if work and a.per_sample is None else None)
    if step is None and a.per_sample is None:
        raise BadInput("predict: give --step-time, or --per-sample (and --fixed)")
    for name in ("step_time", "per_sample", "fixed", "grad_bytes", "params", "overlap", "bucket_mb", "gamma",
                 "cycle_ms", "jitter_cv"):
        v = getattr(a, name)
        if v is not None and v < 0:
            raise BadInput(f"predict: --{name.replace('_', '-')} = {v}: must be >= 0")
    if a.overlap is not None and a.overlap > 1:
        raise BadInput(f"predict: --overlap = {a.overlap}: ω is a share, 0 … 1")
    if a.jitter_cv is not None and a.jitter_cv > 1:
        raise BadInput(f"predict: --jitter-cv = {a.jitter_cv}: σ is a share of the step time, 0 … 1")
    jitter = a.jitter_cv if a.jitter_cv is not None else (work.jitter_cv if work else model.JITTER_CV)
    w = model.Workload(mode, int(batch), float(grad), step_s=step, per_sample_s=a.per_sample,
                       fixed_s=a.fixed or 0.0, limit=work.limit if work else None, jitter_cv=jitter)
    g = a.ranks_per_node or (machine.ranks_per_node if machine else None)
    if not g or g < 1:
        raise BadInput("predict: --ranks-per-node is required")
    intra = model.parse_link(a.intra, "--intra", measured_file) if a.intra else (
        machine.intra if machine else model.PRESETS["NVLink"])
    nics = a.nics_per_node or pred.get("nics_per_node", 1)
    inter = model.node_link(model.parse_link(a.inter, "--inter", measured_file, inter=True), nics) if a.inter else (
        machine.inter if machine else model.node_link(model.PRESETS["IB-100"], nics))
    algos = [x for x in (a.algorithms or "").replace(" ", "").split(",") if x] or pred.get("algorithms")
    lib = a.library or pred.get("library")
    try:
        coll = model.library(lib, algos) if lib else (
            model.library(model.Machine(1, intra, inter).coll().library, algos) if algos else None)
    except BadInput as e:
        raise BadInput(f"predict: --{'algorithms' if 'algorithm' in str(e) else 'library'}: {e}") from None
    m = model.Machine(int(g), intra, inter, coll if coll else (machine.collective if machine else None))
    nodes = _split(a.nodes, "--nodes")
    sizes = _split(a.sizes, "--sizes")
    if nodes and sizes:
        raise BadInput("predict: give --nodes or --sizes, not both")
    if nodes:
        sizes = [n * m.ranks_per_node for n in nodes]
    if not sizes:
        sizes = model.powers_of_two(a.max_ranks or pred.get("max_ranks", 4096))
    for p in sizes:
        model.layout(p, m.ranks_per_node)
    overlap = a.overlap if a.overlap is not None else pred.get("overlap", 2 / 3)
    bucket = (a.bucket_mb if a.bucket_mb is not None else pred.get("bucket_mb", 25)) * 2**20
    cycle = (a.cycle_ms if a.cycle_ms is not None else pred.get("cycle_ms", 0.0)) * 1e-3
    return {"work": w, "machine": m, "sizes": sizes, "overlap": overlap, "bucket_bytes": bucket,
            "gamma": a.gamma or 0.0, "cycle_s": cycle, "study": study_doc, "assumed": assumed}


def prediction(inp: dict) -> dict:
    """The model's rows plus, for a study, the Amdahl/Gustafson fits of its measured points."""
    from mpidl.scaling import model

    w, m = inp["work"], inp["machine"]
    rows = model.predict(w, m, inp["sizes"], inp["overlap"], inp["bucket_bytes"], inp["gamma"], inp["cycle_s"])
    coll = m.coll()
    out: dict[str, Any]  # the fits go in below
    out = {"inputs": {"mode": w.mode, "batch": w.batch, "grad_bytes": w.grad_bytes, "compute_step_s": w.step_s,
                      "per_sample_s": w.per_sample_s, "fixed_s": w.fixed_s, "contention_limit": w.limit,
                      "ranks_per_node": m.ranks_per_node, "intra": model.link_dict(m.intra),
                      "inter_node": model.link_dict(m.inter), "overlap": inp["overlap"],
                      "bucket_bytes": inp["bucket_bytes"], "gamma": inp["gamma"], "cycle_s": inp["cycle_s"],
                      "jitter_cv": w.jitter_cv, "library": coll.library, "algorithms": list(coll.algorithms),
                      "call_latency_s": coll.call_latency, "ring_plateau": coll.ring_plateau},
           "rows": rows, "fits": {}}
    doc = inp.get("study")
    if doc:
        out["fits"] = model.serial_fractions(doc.get("table", []), w.mode)
    return out


def cmd_predict(a: argparse.Namespace) -> int:
    res = prediction(predict_inputs(a))
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    i = res["inputs"]
    print(f"{i['mode']} scaling, batch {i['batch']}{' per rank' if i['mode'] == 'weak' else ' global'}, "
          f"{i['grad_bytes'] / 2**20:.2f} MiB of gradients, {i['ranks_per_node']} ranks per node, "
          f"overlap ω = {i['overlap']:.2f}")
    print(f"intra: {i['intra']['name']} (α {i['intra']['alpha'] * 1e6:.2f} µs, "
          f"{i['intra']['bandwidth_GBps']:.2f} GB/s); "
          f"inter: {i['inter_node']['name']} (α {i['inter_node']['alpha'] * 1e6:.2f} µs, "
          f"{i['inter_node']['bandwidth_GBps']:.2f} GB/s per node)")
    fusion = (f"tensor fusion every {i['cycle_s'] * 1e3:g} ms up to {i['bucket_bytes'] / 2**20:g} MiB" if i["cycle_s"]
              else f"{i['bucket_bytes'] / 2**20:g} MiB buckets")
    print(f"{i['library']} [{', '.join(i['algorithms'])}], {i['call_latency_s'] * 1e6:g} µs a call, ring plateau "
          f"{i['ring_plateau']:g}; {fusion}; stragglers σ = {i['jitter_cv']:.3g}")
    print(f"{'ranks':>6} {'nodes':>6} {'T_c ms':>8} {'ring ms':>9} {'hier ms':>9} {'calls':>5} {'T ms':>9} "
          f"{'samples/s':>12} {'E':>6} {'E no-ovl':>9}  algorithm")
    for r in res["rows"]:
        pr, no = r["predicted"], r["predicted_no_overlap"]
        print(f"{r['size']:>6} {r['nodes']:>6} {1e3 * r['compute_s']:>8.2f} {1e3 * r['allreduce_ring_s']:>9.3f} "
              f"{1e3 * r['allreduce_hierarchical_s']:>9.3f} {r['calls']:>5} {1e3 * pr['step_s']:>9.2f} "
              f"{pr['throughput']:>12,.0f} {pr['efficiency']:>6.3f} {no['efficiency']:>9.3f}  {r['best']}")
    for b, f in res["fits"].items():
        print(f"{f['law']} fit of {b}: serial fraction {f['serial_fraction']:.4f} ({f['points']} measured points)")
    print("terms and their sources: mpidl scale predict --help (NCCL's latencies: its src/graph/tuning.cc; "
          "stragglers: E[max of p normals], σ as stated; buckets and overlap: DDP/Horovod)")
    return 0


def cmd_published(a: argparse.Namespace) -> int:
    """The model against published results: one block per file, a summary line."""
    from mpidl.scaling import published

    given = [k for k, v in vars(a).items() if v is not None and v is not False and k not in ("published", "json")]
    if given:
        raise BadInput(f"predict: --published takes its inputs from the files; --{given[0].replace('_', '-')} "
                       "does not apply")
    results, summary = published.run(a.published)
    if a.json:
        print(json.dumps({"files": [{"title": pub.title, "source": pub.source.model_dump(), "rows": rows}
                                    for pub, rows in results], "summary": summary}, indent=2))
        return 0
    print(published.text(results))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mpidl.scaling.report import write_report

    paths = write_report(Path(args.study_dir), allreduce=Path(args.allreduce) if args.allreduce else None,
                         samples=args.samples, epochs=args.epochs, target=args.target)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _positive(kind):
    def convert(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0 and finite")
        return v
    convert.__name__ = kind.__name__
    return convert


def register(sub) -> None:
    s = sub.add_parser("scale", help="scaling study (strong/weak, with a no-communication baseline), or "
                                     "`scale predict`: the performance model",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SCALE_HELP)
    s.add_argument("study", metavar="STUDY.yaml|predict", help="a study to run, or 'predict'")
    s.add_argument("--force", action="store_true", help="replace a study already in its output folder")
    s.add_argument("--dry-run", action="store_true",
                   help="check every point (its job, and its placement: SLURM's sbatch --test-only) and print "
                        "how each would start; run nothing")
    s.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_scale)

    r = sub.add_parser("report", help="HTML + Markdown + PNG plots + CSV of a scaling study")
    r.add_argument("study_dir", metavar="STUDY_DIR", help="the study's output folder (holds study.json)")
    r.add_argument("--allreduce", metavar="FILE", help="a bench_allreduce JSON (default: the study's allreduce.json)")
    work = r.add_mutually_exclusive_group()
    work.add_argument("--samples", type=_positive(float), metavar="N",
                      help="the work the summary prices: samples to train (default: the study's report.samples, "
                           "else one epoch)")
    work.add_argument("--epochs", type=_positive(float), metavar="E",
                      help="the work as epochs (× the study's report.samples_per_epoch, else the job's synthetic rows)")
    r.add_argument("--target", type=_positive(int), metavar="P", help="a size, in ranks, to project the job to")
    r.set_defaults(func=cmd_report)
