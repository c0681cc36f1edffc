"""Post-training int8 quantization of a trained run, measured on its held-out split.

    report = quantize_run("runs/demo", world)

Variants of the run's newest checkpoint:
  fp32           the trained model
  dynamic_int8   Linear layers with int8 weights, activations quantized on the fly
                 (torch.ao.quantization.quantize_dynamic): no calibration
  static_int8    the whole network in int8 (FX graph mode: BatchNorm folded into the
                 convolutions, activation ranges observed on `calibrate` training rows) — for
                 models with convolutions, where this CPU has an int8 engine (x86/fbgemm)
For each: the held-out loss and accuracy (every rank its share of the held-out rows), the
state_dict's size on disk, and CPU latency per batch at batch 1 and 64 (rank 0 alone, the
other ranks waiting without spinning). Rank 0 writes RUN/quantized/*.pt and RUN/quantize.json.

torch.ao.quantization is deprecated in favour of torchao but still shipped (torch 2.13); its
deprecation warnings are silenced here.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from mpidl.data import ShardedLoader
from mpidl.errors import BadInput
from mpidl.train.evaluate import real_rows
from mpidl.train.inputs import build_inputs
from mpidl.train.objectives import default_for
from mpidl.train.record import versions
from mpidl.train.runs import build_model, load_run

KEY = "quantize"
BATCHES = (1, 64)
STATIC_ENGINES = ("x86", "fbgemm")


@contextlib.contextmanager
def _quiet_ao():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def static_engine() -> Optional[str]:
    """The int8 engine for static quantization on this CPU, or None."""
    have = torch.backends.quantized.supported_engines
    return next((e for e in STATIC_ENGINES if e in have), None)


def dynamic_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with _quiet_ao():
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def static_int8(model: nn.Module, calibration: list[torch.Tensor], engine: str) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    with _quiet_ao(), torch.no_grad():
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), (calibration[0],))
        for x in calibration:
            prepared(x)
        return convert_fx(prepared)


def held_out(world, model: nn.Module, loader: ShardedLoader, classify: bool) -> dict[str, float]:
    """val_loss (and val_accuracy) of `model` over all ranks' shares of the held-out rows."""
    objective = default_for(classify)
    sums = {"loss": 0.0, "count": 0.0, **{k: 0.0 for k in objective.counts_keys()}}
    with torch.no_grad():
        for x, y in real_rows(loader):  # every held-out row once across ranks
            loss, out = objective(model, x, y)
            sums["loss"] += float(loss) * x.shape[0]
            sums["count"] += x.shape[0]
            for k, v in objective.counts(out, y).items():
                sums[k] += float(v)
    keys = sorted(sums)
    vec = np.array([sums[k] for k in keys], np.float64)
    if world.size > 1:
        from mpi4py import MPI

        world.comm.Allreduce(MPI.IN_PLACE, vec, op=MPI.SUM)
    total = dict(zip(keys, vec))
    res = {"val_loss": total["loss"] / total["count"]}
    for name, key in objective.ratios.items():
        res[f"val_{name}"] = total[key] / total["count"]
    return res


def latencies(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 3, seconds: float = 0.2
              ) -> dict[str, float]:
    """Median milliseconds per call of each model on `x`, the models taking turns."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                m(x)
        for _ in range(rounds):
            for name, m in models.items():
                t_end = time.perf_counter() + seconds
                n = 0
                while n < 5 or time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - t0)
                    n += 1
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _save(model: nn.Module, path: Path) -> int:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def quantize_run(run_dir: str, world, calibrate: int = 1024, log: Optional[Callable[[str], None]] = print) -> dict:
    """Quantize the run's newest checkpoint; the report (on every rank; rank 0 writes it)."""
    if calibrate < 1:
        raise BadInput(f"{KEY}: --calibrate {calibrate}: give at least 1 row")
    run = world.agree(lambda: load_run(run_dir, KEY))
    folder = Path(run_dir) if Path(run_dir).is_dir() else run.checkpoint.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    # Standardization statistics are cached in the run folder it was trained with: this one.
    spec = run.spec.model_copy(update={"output": str(folder).replace("{", "{{").replace("}", "}}")})
    inputs = build_inputs(spec, world)

    def check() -> None:
        if inputs.val_loader is None:
            raise BadInput(f"{KEY}: {run_dir}: its job has no held-out split (data.val_fraction = "
                           f"{spec.data.val_fraction}, no data.val_files)")
    world.agree(check)
    assert inputs.val_loader is not None and inputs.val_source is not None  # check() above
    model = world.agree(lambda: build_model(run, inputs.train_source, KEY)).float()

    variants: dict[str, nn.Module] = {"fp32": model, "dynamic_int8": dynamic_int8(model)}
    static_note = None
    engine = static_engine()
    if not has_conv(model):
        static_note = "not applied: no convolutions (dynamic int8 covers the Linear layers)"
    elif engine is None:
        static_note = f"not supported on this CPU (int8 engines: {torch.backends.quantized.supported_engines})"
    else:
        # The same first training rows on every rank, so every rank builds the same model.
        from mpi4py import MPI

        from mpidl.world import world_for

        one = world_for(MPI.COMM_SELF)
        batch = min(64, calibrate, len(inputs.train_source))
        loader = ShardedLoader(inputs.train_source, one, batch, shuffle="none", prefetch=2,
                               transform=inputs.eval_transform)
        calibration = []
        batches = iter(loader)
        for x, _ in batches:
            calibration.append(x.clone())
            if len(calibration) * batch >= calibrate:
                break
        batches.close()
        variants["static_int8"] = static_int8(model, calibration, engine)

    results: dict[str, dict] = {}
    for name, m in variants.items():
        results[name] = held_out(world, m, inputs.val_loader, inputs.classify)

    report = {"run": str(folder), "checkpoint": str(run.checkpoint), "model": spec.model.name,
              "held_out_rows": len(inputs.val_source),
              "calibration_rows": calibrate if "static_int8" in variants else 0,
              "engine": torch.backends.quantized.engine, "threads": torch.get_num_threads(),
              "static_int8": static_note, "variants": results, "versions": versions()}
    if world.rank == 0:
        out = folder / "quantized"
        out.mkdir(parents=True, exist_ok=True)
        for name, m in variants.items():
            results[name]["size_bytes"] = _save(m, out / f"{name}.pt")
        inputs.val_loader.set_epoch(0)
        val = iter(inputs.val_loader)
        x = next(val)[0].clone()
        val.close()
        for b in BATCHES:
            xb = x[np.arange(b) % x.shape[0]]
            for name, ms in latencies(variants, xb).items():
                results[name].setdefault("latency_ms", {})[str(b)] = ms
        tmp = folder / "quantize.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, folder / "quantize.json")
        if log is not None:
            log(render(report))
    world.barrier("rank 0's timings and report")  # asleep, so rank 0's timings keep their core
    return report


def render(report: dict) -> str:
    """The report as a table."""
    rows = report["variants"]
    metric = "val_accuracy" if all("val_accuracy" in r for r in rows.values()) else "val_loss"
    head = ["variant", metric, "size MB", *(f"ms @ batch {b}" for b in BATCHES), "speed-up @ 64"]
    base = rows["fp32"]["latency_ms"][str(BATCHES[-1])]
    lines = [head]
    for name, r in rows.items():
        lines.append([name, f"{r[metric]:.4f}", f"{r['size_bytes'] / 1e6:.3f}",
                      *(f"{r['latency_ms'][str(b)]:.3f}" for b in BATCHES),
                      f"{base / r['latency_ms'][str(BATCHES[-1])]:.2f}x"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [f"{report['model']} from {report['checkpoint']}: {report['held_out_rows']} held-out rows, "
            f"{report['threads']} thread(s), engine {report['engine']}"]
    text += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in lines]
    if report["static_int8"]:
        text.append(f"static int8: {report['static_int8']}")
    return "\n".join(text)
