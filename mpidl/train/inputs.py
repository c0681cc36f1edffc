"""The training inputs a job spec describes: data files, sources, transforms and loaders."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from mpidl import log, usercode
from mpidl.data import H5Source, ShardedLoader
from mpidl.data.preprocess import Pipeline, Standardizer
from mpidl.data.scan import check_finite, check_labels, label_range
from mpidl.errors import BadInput
from mpidl.spec import JobSpec, check_run_folders


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

    # if_missing: another job may be writing the same file; it is then taken as that job wrote it
    common = dict(seed=syn.seed, world=world, if_missing=True)
    if syn.noise is not None:
        common["noise"] = syn.noise
    if syn.kind == "images":
        wrote = synth.synth_images(path, syn.rows, classes=syn.classes or 10, channels=syn.channels, size=syn.size,
                                   **common)
    else:
        wrote = synth.synth_tabular(path, syn.rows, features=syn.features, rule=syn.rule, classes=syn.classes,
                                    **common)
    if wrote:
        log.get().info("wrote synthetic %s data: %s (%d rows)", syn.kind, path, syn.rows)


def sources(spec: JobSpec, world) -> tuple[H5Source, Optional[H5Source]]:
    """The training source and the held-out one (val_files, or the last val_fraction of rows)."""
    d = spec.data
    full = H5Source(d.files, keys=d.keys)
    world.agree(full.validate)
    if d.val_files is not None:
        val = H5Source(d.val_files, keys=d.keys)
        world.agree(val.validate)
        world.agree(lambda: same_rows(full, val))
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


def same_rows(train: H5Source, val: H5Source) -> None:
    """BadInput unless the held-out rows are shaped and typed as the training rows: the model
    takes one kind of row (another shape or dtype fails in the first evaluation, mid-run)."""
    for key in train.keys:
        a, b = (train.shapes[key], train.dtypes[key]), (val.shapes[key], val.dtypes[key])
        if a != b:
            raise BadInput(f"data.val_files: {val.files[0]}: dataset '{key}' rows are {_row(*b)}, but in the "
                           f"training files ({train.files[0]}) {_row(*a)}")


def _row(shape: tuple, dtype) -> str:
    return f"{shape} {dtype}" if shape else f"scalars {dtype}"


@dataclass
class Inputs:
    train_source: H5Source
    val_source: Optional[H5Source]
    train_transform: Pipeline
    eval_transform: Pipeline
    loader: ShardedLoader
    val_loader: Optional[ShardedLoader]  # an evaluation loader: every held-out row once across ranks
    classes: Optional[int] = None        # classification: the spec's class count, or the labels'

    @property
    def classify(self) -> bool:
        """Integer targets: a classification job."""
        return _classify(self.train_source)


def _classify(src: H5Source) -> bool:
    return src.dtypes[src.keys[1]].kind in "iu"


def _class_arg(spec: JobSpec) -> str:
    """The model argument that sets its number of outputs for classification."""
    return "out_features" if spec.model.name == "linear" else "num_classes"


def spec_classes(spec: JobSpec) -> Optional[int]:
    """The class count a spec gives: model.args (num_classes, a linear model's out_features),
    else data.synth.classes; None when it gives none."""
    arg = _class_arg(spec)
    given = spec.model.args.get(arg)
    if given is not None:
        if not isinstance(given, int) or isinstance(given, bool) or given < 1:
            raise BadInput(f"model.args.{arg} = {given!r}: a class count must be a positive integer")
        return given
    return spec.data.synth.classes if spec.data.synth is not None else None


def count_classes(spec: JobSpec, world, train: H5Source, val: Optional[H5Source]) -> int:
    """The job's class count, checked against every label of both splits (collective, one
    scan of the labels): the spec's, or one more than the largest label when the spec gives
    none. BadInput on every rank, naming file, dataset, row and value, for a label outside
    [0, classes)."""
    key = train.keys[1]
    given = world.agree(lambda: spec_classes(spec))
    if given is not None:
        for src in (train, val):
            if src is not None:
                check_labels(src, world, key, given)
        return given
    ranges = [label_range(src, world, key) for src in (train, val) if src is not None]
    classes = max(hi for _, hi in ranges) + 1
    for src, (lo, _) in zip((train, val), ranges):
        if lo < 0:
            check_labels(src, world, key, classes)  # names the first negative label
    if classes < 2:
        raise BadInput(f"{train.files[0]}: dataset '{key}': every label is {classes - 1}, a classifier needs "
                       f"at least 2 classes (model.args.{_class_arg(spec)} sets the count)", collective=world.size > 1)
    return classes


def with_classes(spec: JobSpec, classes: Optional[int]) -> JobSpec:
    """`spec` with the class count in model.args where its model would not take it from the
    spec otherwise: every piece that builds the model, and the checkpoint's copy of the spec,
    then agree on it."""
    arg = _class_arg(spec)
    if classes is None or arg in spec.model.args:
        return spec
    if usercode.is_target(spec.model.name):
        from mpidl.train.models import takes_classes

        if not takes_classes(spec):  # your model sets its outputs itself
            return spec
    elif spec_classes(spec) is not None and arg == "num_classes":
        return spec  # a built-in takes it from the spec
    model = spec.model.model_copy(update={"args": {**spec.model.args, arg: classes}})
    return spec.model_copy(update={"model": model})


def user_transform(spec: JobSpec, key: str) -> Optional[Callable]:
    """The spec's `transform` / `eval_transform`: fn(x, y, **args) -> (x, y), or a class made with args."""
    code = getattr(spec, key)
    if code is None:
        return None
    target = usercode.resolve(code.name, f"{key}.name", spec.code_dirs)
    return usercode.two_argument(target, code.args, key, code.name, "fn(x, y)")


def build_inputs(spec: JobSpec, world) -> Inputs:
    """Data on disk, validated on every rank (labels too), and the loaders of this rank's shards."""
    # The run folder is first used here (the standardizer's cache); rank 0 makes and writes it.
    world.agree(lambda: check_run_folders(spec) if world.rank == 0 else None)
    ensure_data(spec, world)
    train_src, val_src = sources(spec, world)
    # Labels before anything costly: a label a model cannot take stops the job here.
    classes = count_classes(spec, world, train_src, val_src) if _classify(train_src) else None
    d, pre = spec.data, spec.data.preprocess
    # Float targets (regression) likewise, being small beside the inputs: a NaN or Inf there
    # would stop the job mid-run as if the model had diverged.
    if train_src.dtypes[d.keys[1]].kind == "f":
        for src in (train_src, val_src):
            if src is not None:
                check_finite(src, world, d.keys[1], "target")
    standardizer = None
    if pre.standardize:
        standardizer = Standardizer.fit(train_src, world, key=d.keys[0], per=pre.standardize_per,
                                        cache_dir=str(spec.run_dir))
    train_tf = Pipeline(pre.scale_uint8, standardizer, pre.crop, pre.padding, pre.flip, seed=spec.seed, train=True,
                        then=world.agree(lambda: user_transform(spec, "transform")))
    eval_tf = Pipeline(pre.scale_uint8, standardizer, pre.crop, pre.padding, False, seed=spec.seed, train=False,
                       then=world.agree(lambda: user_transform(spec, "eval_transform")))
    loader = ShardedLoader(train_src, world, d.batch, seed=spec.seed, shuffle=d.shuffle, drop_last=d.drop_last,
                           prefetch=d.prefetch, transform=train_tf, stage_dir=d.stage_dir)
    val_loader = None
    if val_src is not None:  # every held-out row exactly once, on any number of ranks
        val_loader = ShardedLoader(val_src, world, d.batch, prefetch=2, transform=eval_tf, evaluation=True)
    return Inputs(train_src, val_src, train_tf, eval_tf, loader, val_loader, classes)


def steps_per_epoch(spec: JobSpec, world, inputs: Inputs) -> int:
    """Optimizer steps per epoch; BadInput (on every rank at once) when there is not one."""
    steps = len(inputs.loader) // spec.accumulate

    def check() -> None:
        if steps < 1:
            raise BadInput(f"data.batch × accumulate = {spec.data.batch} × {spec.accumulate} leaves no full step "
                           f"per epoch on {world.size} ranks ({len(inputs.train_source)} training rows)")
    world.agree(check)
    return steps
