"""The training inputs a job spec describes: data files, sources, transforms and loaders."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from mpidl import log
from mpidl.data import H5Source, ShardedLoader
from mpidl.data.preprocess import Pipeline, Standardizer
from mpidl.errors import BadInput
from mpidl.spec import JobSpec


def ensure_data(spec: JobSpec, world) -> None:
    """Write the synthetic dataset the spec describes if its file is missing (all ranks help)."""
    syn = spec.data.synth
    if syn is None or not isinstance(spec.data.files, str) or any(c in spec.data.files for c in "*?["):
        return
    path = spec.data.files
    missing = not os.path.exists(path) if world.rank == 0 else None
    if world.size > 1:
        missing = world.comm.bcast(missing, root=0)
    if not missing:
        return
    from mpidl.data import synth

    common = dict(seed=syn.seed, world=world)
    if syn.noise is not None:
        common["noise"] = syn.noise
    if syn.kind == "images":
        synth.synth_images(path, syn.rows, classes=syn.classes or 10, channels=syn.channels, size=syn.size, **common)
    else:
        synth.synth_tabular(path, syn.rows, features=syn.features, rule=syn.rule, classes=syn.classes, **common)
    log.get().info("wrote synthetic %s data: %s (%d rows)", syn.kind, path, syn.rows)


def sources(spec: JobSpec, world) -> tuple[H5Source, Optional[H5Source]]:
    """The training source and the held-out one (val_files, or the last val_fraction of rows)."""
    d = spec.data
    full = H5Source(d.files, keys=d.keys)
    world.agree(full.validate)
    if d.val_files is not None:
        val = H5Source(d.val_files, keys=d.keys)
        world.agree(val.validate)
        return full, val
    n = len(full)
    n_val = int(round(n * d.val_fraction))
    if n_val == 0:
        return full, None
    train = H5Source(d.files, keys=d.keys, rows=(0, n - n_val))
    val = H5Source(d.files, keys=d.keys, rows=(n - n_val, n))
    world.agree(train.validate)
    world.agree(val.validate)
    return train, val


@dataclass
class Inputs:
    train_source: H5Source
    val_source: Optional[H5Source]
    train_transform: Pipeline
    eval_transform: Pipeline
    loader: ShardedLoader
    val_loader: Optional[ShardedLoader]

    @property
    def classify(self) -> bool:
        """Integer targets: a classification job."""
        src = self.train_source
        return src.dtypes[src.keys[1]].kind in "iu"


def build_inputs(spec: JobSpec, world) -> Inputs:
    """Data on disk, validated on every rank, and the loaders of this rank's shards."""
    ensure_data(spec, world)
    train_src, val_src = sources(spec, world)
    d, pre = spec.data, spec.data.preprocess
    standardizer = None
    if pre.standardize:
        standardizer = Standardizer.fit(train_src, world, key=d.keys[0], per=pre.standardize_per,
                                        cache_dir=str(spec.run_dir))
    train_tf = Pipeline(pre.scale_uint8, standardizer, pre.crop, pre.padding, pre.flip, seed=spec.seed, train=True)
    eval_tf = Pipeline(pre.scale_uint8, standardizer, pre.crop, pre.padding, False, seed=spec.seed, train=False)
    loader = ShardedLoader(train_src, world, d.batch, seed=spec.seed, shuffle=d.shuffle, drop_last=d.drop_last,
                           prefetch=d.prefetch, transform=train_tf, stage_dir=d.stage_dir)
    val_loader = None
    if val_src is not None:
        eval_batch = min(d.batch, len(val_src) // world.size)
        if eval_batch >= 1:
            val_loader = ShardedLoader(val_src, world, eval_batch, seed=spec.seed, shuffle="none",
                                       prefetch=2, transform=eval_tf)
    return Inputs(train_src, val_src, train_tf, eval_tf, loader, val_loader)


def steps_per_epoch(spec: JobSpec, world, inputs: Inputs) -> int:
    """Optimizer steps per epoch; BadInput (on every rank at once) when there is not one."""
    steps = len(inputs.loader) // spec.accumulate

    def check() -> None:
        if steps < 1:
            raise BadInput(f"data.batch × accumulate = {spec.data.batch} × {spec.accumulate} leaves no full step "
                           f"per epoch on {world.size} ranks ({len(inputs.train_source)} training rows)")
    world.agree(check)
    return steps
