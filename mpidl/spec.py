"""JobSpec: the YAML schema of a training job, validated strictly on load; the slurm: section
with its SLURM time and #SBATCH helpers; CommandSpec, the resources of `mpidl submit -- CMD`.

Unknown keys, wrong types and impossible values give one line naming the file, the key
path and the value (BadInput, exit 2). `--set a.b=c` overrides go through the same checks
(`mpidl.config`: what every schema's reading shares).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import (
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from mpidl.config import (  # noqa: F401
    Strict,
    _one_line,
    _yaml,
    apply_sets,
    check_name,
    check_output,
    parse_yaml,
    quoted,
    read_text,
    read_yaml,
    validate,
)
from mpidl.errors import BadInput


class SynthSpec(Strict):
    """Generate the data files when they are missing (the demo's embedded default)."""

    kind: Literal["images", "tabular"] = Field(description="images: N×C×H×W uint8 and int64 labels; tabular: "
                                                         "float features and targets from a known rule")
    rows: int = Field(gt=0, description="rows to write")
    classes: Optional[int] = Field(default=None, ge=2, description="images: default 10; tabular: classify into this "
                                                                   "many classes instead of regressing")
    channels: int = Field(default=3, ge=1, description="images: channels")
    size: int = Field(default=16, ge=1, description="images: height and width")
    features: int = Field(default=16, ge=1, description="tabular: features per row")
    rule: Literal["linear", "nonlinear"] = Field(default="linear", description="tabular: how targets follow "
                                                                                "from features")
    noise: Optional[float] = Field(default=None, ge=0, description="standard deviation of the noise added; default "
                                                                   "60 (images, in pixel units), 0.05 (tabular)")
    seed: int = Field(default=0, description="the generator's seed")


class PreprocessSpec(Strict):
    scale_uint8: bool = Field(default=True, description="uint8 inputs to floats in [0, 1]")
    standardize: bool = Field(default=False, description="subtract the mean, divide by the standard deviation, both "
                                                         "from one allreduce over the whole training set")
    standardize_per: Literal["feature", "channel"] = Field(default="feature", description="statistics per feature "
                                                                                          "or per image channel")
    crop: Optional[int] = Field(default=None, ge=1, description="training: a random crop of this size "
                                                                "(held-out: the centre)")
    padding: int = Field(default=0, ge=0, description="zeros around each image before the crop")
    flip: bool = Field(default=False, description="training: mirror each image left-right with probability 1/2")


class DataSpec(Strict):
    files: Union[str, list[str]] = Field(description="HDF5 files: one path, a list, or a glob (train-*.h5)")
    keys: list[str] = Field(default_factory=lambda: ["x", "y"], min_length=2,
                            description="datasets read: inputs first, targets second")
    batch: int = Field(gt=0, description="samples per rank per step")
    val_fraction: float = Field(default=0.1, ge=0, lt=1, description="the last rows held out for evaluation "
                                                                     "(unless val_files); 0: no evaluation")
    val_files: Optional[Union[str, list[str]]] = Field(default=None, description="held-out files, instead of "
                                                                                 "val_fraction")
    shuffle: Literal["block", "exact", "none"] = Field(default="block", description="block: chunk-aligned blocks in "
                                                       "random order, rows shuffled within a window; exact: one "
                                                       "global permutation; none: file order")
    drop_last: bool = Field(default=True, description="false: pad the last batch instead of dropping it")
    prefetch: int = Field(default=4, ge=1, description="batches read ahead")
    stage_dir: Optional[str] = Field(default=None, description="node-local copy of each rank's share: a folder "
                                     "($VARS and ~ expand) or auto ($SLURM_TMPDIR, $TMPDIR, the temp dir)")
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec, description="on the device, per batch")
    synth: Optional[SynthSpec] = Field(default=None, description="write files (one path) with synthetic data when "
                                                                 "it is missing")


BUILTIN_MODELS = ("linear", "mlp", "small_cnn", "resnet18", "resnet50", "mobilenet_v2")
BUILTIN_OBJECTIVES = ("classification", "regression")


def _code_name(value: str, builtins: tuple[str, ...]) -> str:
    """A built-in's name, or your code's as package.module:attr (see `mpidl.usercode`)."""
    if value in builtins:
        return value
    if ":" not in value:
        raise ValueError(f"not a built-in ({', '.join(builtins)}) nor your code as package.module:attr")
    from mpidl.usercode import check_syntax

    return check_syntax(value)


class ModelSpec(Strict):
    name: str = Field(description="a built-in (linear, mlp, small_cnn, resnet18, resnet50, mobilenet_v2) "
                                  "or your class or factory as package.module:attr")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model")
    channels_last: bool = Field(default=False, description="images in channels-last memory format")
    compile: bool = Field(default=False, description="torch.compile the model")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _code_name(v, BUILTIN_MODELS)


class CodeSpec(Strict):
    """Your code: `name: package.module:attr` and its keyword arguments (a bare string is the name)."""

    name: str = Field(description="package.module:attr, found from the job file's folder, then PYTHONPATH")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _code_name(v, ())


class ObjectiveSpec(CodeSpec):
    """The loss of a step: classification or regression (default: from the labels' dtype), or
    yours: a class (an mpidl Objective, or a loss module called as loss(output, target)) made
    with args, or a function called as fn(output, target, **args)."""

    name: str = Field(description="classification, regression, or your class or function as package.module:attr")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _code_name(v, BUILTIN_OBJECTIVES)


class ClipWeightsSpec(Strict):
    """After every optimizer step: each parameter into [min, max] (WGAN critics), or each
    weight's rows (one output unit's incoming weights) to an L2 norm of at most max_norm."""

    min: Optional[float] = Field(default=None, description="lower bound of every parameter (with max)")
    max: Optional[float] = Field(default=None, description="upper bound of every parameter (with min)")
    max_norm: Optional[float] = Field(default=None, gt=0, description="largest L2 norm of a weight's row "
                                                                      "(instead of min and max)")

    @model_validator(mode="after")
    def _one_kind(self) -> "ClipWeightsSpec":
        ranged = self.min is not None or self.max is not None
        if ranged and (self.min is None or self.max is None):
            raise ValueError("give both min and max")
        if ranged == (self.max_norm is not None):
            raise ValueError("give min and max, or max_norm")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = Field(default="sgd", description="the optimizer")
    lr: float = Field(gt=0, description="learning rate at one rank (see schedule.scale_lr)")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd: momentum")
    nesterov: bool = Field(default=False, description="sgd: Nesterov momentum")
    weight_decay: float = Field(default=0.0, ge=0, description="L2 penalty (adamw: decoupled)")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="adam, adamw: the moments' decay rates")
    clip_grad_norm: Optional[float] = Field(default=None, gt=0,
                                            description="global L2 norm of the averaged gradient, at most")
    clip_weights: Optional[ClipWeightsSpec] = Field(default=None, description="after every step: each parameter "
                                                    "into [min, max], or each weight row to at most max_norm")

    @model_serializer(mode="wrap")
    def _unset_clipping_left_out(self, handler: SerializerFunctionWrapHandler) -> dict:
        # Clipping that is off leaves the dump, and so the fingerprint of a job (what a
        # checkpoint must match to resume), as it was before these options existed.
        out = handler(self)
        for k in ("clip_grad_norm", "clip_weights"):
            if k in out and out[k] is None:
                del out[k]
        return out


class ScheduleSpec(Strict):
    scale_lr: bool = Field(default=True, description="multiply lr by the world size (Goyal et al.)")
    warmup_epochs: float = Field(default=0.0, ge=0, description="linear warm-up from lr to the scaled lr")
    kind: Literal["constant", "cosine", "step"] = Field(default="constant", description="after the warm-up")
    step_epochs: float = Field(default=30, gt=0, description="step: multiply by gamma every this many epochs")
    gamma: float = Field(default=0.1, gt=0, le=1, description="step: the factor")
    min_lr: float = Field(default=0.0, ge=0, description="cosine: the lr it ends at")


class HorovodSpec(Strict):
    compression: Literal["none", "fp16"] = Field(default="none", description="gradients sent as fp16")
    op: Literal["average", "adasum"] = Field(default="average", description="how gradients are combined")
    fusion_threshold_mb: Optional[float] = Field(default=None, ge=0,
                                                 description="HOROVOD_FUSION_THRESHOLD; "
                                                             "default: the environment's, else Horovod's")
    cycle_time_ms: Optional[float] = Field(default=None, gt=0, description="HOROVOD_CYCLE_TIME; default: the "
                                                                       "environment's, else Horovod's (1 ms)")
    # whole seconds, as Horovod reads them
    stall_check_s: Optional[int] = Field(default=None, ge=1, description="warn about ranks missing from an allreduce; "
                                                                         "default: HOROVOD_STALL_CHECK_TIME_SECONDS, "
                                                                         "else 10")
    stall_shutdown_s: Optional[int] = Field(default=None, ge=1,
                                            description="then end the job; default: "
                                                        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, else 30")


class DDPSpec(Strict):
    bucket_cap_mb: float = Field(default=25, gt=0, description="DDP's gradient bucket size")
    timeout_s: float = Field(default=45, gt=0, description="a collective waiting longer (a lost rank) ends the job")


class MPISpec(Strict):
    bucket_mb: float = Field(default=25, gt=0, description="gradients are averaged in buckets of this size")


class CheckpointSpec(Strict):
    dir: Optional[str] = Field(default=None, description="default: OUTPUT/checkpoints; every node must see it")
    every_steps: Optional[int] = Field(default=None, gt=0, description="a checkpoint every this many steps")
    every_epochs: Optional[int] = Field(default=1, gt=0, description="a checkpoint every this many epochs")
    every_minutes: Optional[float] = Field(default=None, gt=0, description="a checkpoint once this many minutes "
                                           "have passed since the last one (agreed by the ranks at a step boundary)")
    keep: int = Field(default=2, ge=1, description="checkpoints kept (the newest)")


class DistillSpec(Strict):
    """Knowledge distillation: loss = alpha·T²·KL(teacher ‖ student at temperature T) + (1 − alpha)·CE."""

    teacher: str = Field(description="a trained run folder (or one checkpoint file); its checkpoint holds its spec")
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the teacher's term")
    temperature: float = Field(default=4.0, gt=0, description="T, softening both distributions")


_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def slurm_time_seconds(text: str) -> int:
    """Seconds in a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S (ValueError otherwise)."""
    m = _SLURM_TIME.fullmatch(text.strip())
    if not m:
        raise ValueError("not a SLURM time limit")
    days, a, b, c = (None if g is None else int(g) for g in m.groups())
    assert a is not None  # the one group the pattern requires
    if days is not None:                      # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = a, b or 0, c or 0
        if hours > 23:
            raise ValueError("hours after a day count must be below 24")
    elif c is not None:                       # H:M:S
        assert b is not None  # c only after b
        hours, minutes, seconds = a, b, c
    else:                                     # M or M:S: the minutes may run past 59
        hours, minutes, seconds = 0, a, b or 0
    if (days is not None or c is not None) and minutes > 59:
        raise ValueError("minutes must be below 60")
    if seconds > 59:
        raise ValueError("seconds must be below 60")
    total = (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError("a time limit must be positive")
    return total


def sbatch_problem(value: str) -> Optional[str]:
    """Why `value` cannot pass through an #SBATCH line, or None: sbatch reads one line per
    option, and submitit's quoting of #SBATCH values loses backslashes."""
    if any(ord(c) < 32 or c in "\\\x7f" for c in value):
        return "newlines, control characters and backslashes cannot pass through an #SBATCH line"
    return None


def _sbatch_safe(value: str) -> str:
    problem = sbatch_problem(value)
    if problem:
        raise ValueError(problem)
    return value


REDACTED = "<redacted>"

# Options mpidl writes itself; setting them under slurm.sbatch would contradict the section.
OWNED_SBATCH = {"job-name", "partition", "account", "qos", "nodes", "ntasks", "ntasks-per-node", "mincpus",
                "gpus-per-node", "gres", "cpus-per-task", "mem", "time", "t", "constraint", "exclusive",
                "signal", "requeue", "no-requeue", "output", "error", "open-mode", "array", "wrap",
                "gpus"}  # a total beside gpus-per-node


def owned_prefix_of(key: str) -> list[str]:
    """The owned options `key` abbreviates: sbatch (getopt_long) reads any unique prefix of a
    long option as that option (`part` is `partition`), an exact name first."""
    return sorted(o for o in OWNED_SBATCH if o.startswith(key) and o != key)


class SlurmSpec(Strict):
    """How `mpidl submit` asks SLURM for the job. Not part of the checkpoint fingerprint:
    resources may change across a requeue or a resubmission."""

    job_name: Optional[str] = Field(default=None, description="default: the job's name")
    partition: Optional[str] = Field(default=None, description="default: the cluster's")
    account: Optional[str] = Field(default=None, description="the account charged")
    qos: Optional[str] = Field(default=None, description="quality of service")
    nodes: Union[int, str] = Field(default=1, description="nodes: a count, or a range min-max (2-4): the job starts "
                                   "on as many as are free, and a job that loses a node is requeued by SLURM and "
                                   "resumes on the nodes left, at the world size it then has")
    tasks_per_node: Optional[int] = Field(default=None, ge=1,
                                          description="ranks per node; default: one per GPU, else 1")
    gpus_per_node: int = Field(default=0, ge=0, description="GPUs per node (--gpus-per-node)")
    cpus_per_task: Optional[int] = Field(default=None, ge=1, description="default: cpus_per_node split evenly")
    cpus_per_node: Optional[int] = Field(default=None, ge=1, description="the node's CPUs, to split among its ranks")
    mem: Optional[str] = Field(default=None, description="per node, SLURM units: 64G, 4000M; 0 = all")
    time: str = Field(default="1:00:00", description="SLURM format: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S")
    constraint: Optional[str] = Field(default=None, description="node features (--constraint)")
    exclusive: bool = Field(default=False, description="whole nodes (--exclusive)")
    sbatch: dict[str, Union[str, int, bool]] = Field(default_factory=dict, description="more #SBATCH options")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the ranks start")
    env: dict[str, str] = Field(default_factory=dict, description="exported to every rank")
    venv: Optional[str] = Field(default=None, description="the virtual environment on the compute nodes; "
                                                          "default: the one running `mpidl submit`")
    launcher: Literal["srun", "mpirun"] = Field(default="srun", description="srun --mpi=pmix, or mpirun inside the "
                                                                           "allocation (sites without PMIx)")
    signal: Literal["USR2", "TERM"] = Field(default="USR2", description="the warning SLURM sends before the end")
    signal_lead_s: int = Field(default=90, ge=1, le=65535, description="seconds before the end")
    requeue_limit: int = Field(default=3, ge=0, description="requeues after preemption or time limit")

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("a node count, or a range min-max (2-4)")
        text = str(v).strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
        if not m:
            raise ValueError("a node count, or a range min-max (2-4)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo < 1:
            raise ValueError("at least 1 node")
        if hi < lo:
            raise ValueError(f"a range min-max with min <= max, not {lo}-{hi}")
        return lo if lo == hi else f"{lo}-{hi}"

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # a bare number is minutes, as in sbatch
        if isinstance(v, str):
            try:
                slurm_time_seconds(v)
            except ValueError as e:
                raise ValueError(f"{e} (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)") from None
        return v

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and not re.fullmatch(r"\d+[KMGT]?", v):
            raise ValueError("SLURM memory is a number with an optional K, M, G or T (e.g. 64G; 0 = all of it)")
        return v

    @field_validator("job_name", "partition", "account", "qos", "constraint")
    @classmethod
    def _one_line(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _sbatch_safe(v)

    @field_validator("sbatch")
    @classmethod
    def _extra(cls, v: dict) -> dict:
        for key, value in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ValueError(f"'{key}' is not an sbatch long option name (e.g. mail-type)")
            if key in OWNED_SBATCH:
                raise ValueError(f"'{key}' is set from the section's own keys (or by mpidl), not here")
            owned = owned_prefix_of(key)
            if owned:
                raise ValueError(f"'{key}' abbreviates --{' or --'.join(owned)} (sbatch reads a unique prefix of an "
                                 "option as the option), which is set from the section's own keys (or by mpidl)")
            if value is False:
                raise ValueError(f"'{key}': false; leave the option out instead")
            _sbatch_safe(str(value))
        return v

    @field_validator("signal_lead_s")
    @classmethod
    def _lead(cls, v: int, info) -> int:
        time = info.data.get("time")  # absent when the time limit itself was refused
        if time is not None and v >= slurm_time_seconds(time):
            raise ValueError(f"not below the time limit slurm.time = {time} ({slurm_time_seconds(time)} s): "
                             "SLURM would send the warning as the job starts")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict) -> dict:
        for key in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"'{key}' is not an environment variable name")
        return v

    @field_validator("setup")
    @classmethod
    def _setup(cls, v: list) -> list:
        for line in v:
            if "\n" in line:
                raise ValueError("one shell line per list item")
        return v

    @field_validator("gpus_per_node")
    @classmethod
    def _gpus_fit(cls, v: int, info) -> int:
        tasks = info.data.get("tasks_per_node")
        if v and tasks is not None:
            if v > tasks:
                raise ValueError(f"more GPUs than the {tasks} rank(s) per node (tasks_per_node) can use; "
                                 "leave tasks_per_node out for one rank per GPU")
            if tasks % v:
                raise ValueError(f"tasks_per_node = {tasks} ranks cannot share {v} GPUs evenly")
        return v

    @field_validator("cpus_per_node")
    @classmethod
    def _cpus_fit(cls, v: Optional[int], info) -> Optional[int]:
        tasks = info.data.get("tasks_per_node") or max(1, info.data.get("gpus_per_node") or 0)
        each = info.data.get("cpus_per_task") or 1
        if v is not None and tasks * each > v:
            raise ValueError(f"fewer than tasks_per_node × cpus_per_task = {tasks} × {each}")
        return v

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def min_nodes(self) -> int:
        return int(str(self.nodes).split("-")[0])

    @property
    def max_nodes(self) -> int:
        return int(str(self.nodes).split("-")[-1])

    @property
    def node_range(self) -> bool:
        """Whether the job asks for a range of node counts (an elastic job)."""
        return self.min_nodes < self.max_nodes

    @property
    def ranks(self) -> int:
        """The most ranks the job can have."""
        return self.max_nodes * self.ranks_per_node

    @property
    def time_seconds(self) -> int:
        return slurm_time_seconds(self.time)

    def cpus_for_each_task(self) -> Optional[int]:
        """cpus_per_task, else the node's CPUs split evenly among its ranks, else None (SLURM's default)."""
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        if self.cpus_per_node is not None:
            return max(1, self.cpus_per_node // self.ranks_per_node)
        return None


class JobSpec(Strict):
    name: str = Field(default="job", description="one folder name: the run folder's {name}, the SLURM job's name")
    seed: int = Field(default=0, description="seeds the model, the shuffling and the augmentation")
    epochs: Optional[int] = Field(default=None, gt=0, description="passes over the training rows (give epochs or "
                                                                  "steps)")
    steps: Optional[int] = Field(default=None, gt=0, description="stop after this many optimizer steps")
    accumulate: int = Field(default=1, ge=1, description="batches per optimizer step")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16: autocast of forward and loss")
    backend: Literal["horovod", "ddp", "mpi", "none"] = Field(default="horovod", description="how gradients are "
                                                              "averaged; none: not at all (the scaling baseline)")
    horovod: HorovodSpec = Field(default_factory=HorovodSpec, description="backend horovod's settings")
    ddp: DDPSpec = Field(default_factory=DDPSpec, description="backend ddp's settings")
    mpi: MPISpec = Field(default_factory=MPISpec, description="backend mpi's settings")
    data: DataSpec = Field(description="the training data")
    model: ModelSpec = Field(description="the model")
    optimizer: OptimizerSpec = Field(description="the optimizer")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="the learning rate over the run")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="when and where checkpoints "
                                                                                   "are written")
    output: str = Field(default="runs/{name}", description="the run folder; {name} its only placeholder, no %")
    log_every: int = Field(default=20, gt=0, description="a metrics record every this many steps")
    watchdog_s: Optional[float] = Field(default=None, ge=0, description="a rank that makes no progress this many "
                                        "seconds ends the job, named (exit 4); default: 30 × the mean step time, at "
                                        "least 120; 0: off")
    timing: Literal["sync", "off"] = Field(default="sync", description="synchronise CUDA to split step time")
    target_accuracy: Optional[float] = Field(default=None, gt=0, le=1, description="reported, not enforced")
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="what mpidl submit asks SLURM for")
    distill: Optional[DistillSpec] = Field(default=None, description="knowledge distillation from a trained run")
    objective: Optional[ObjectiveSpec] = Field(default=None, description="default: from the labels' dtype")
    transform: Optional[CodeSpec] = Field(default=None, description="fn(x, y) -> (x, y) on each training batch, "
                                                                    "on its device, after data.preprocess")
    eval_transform: Optional[CodeSpec] = Field(default=None, description="the same for held-out batches")
    metrics: dict[str, CodeSpec] = Field(default_factory=dict,
                                         description="name -> fn(output, target, **args) "
                                                     "giving a batch's count; logged as count/samples")

    # The folder of the job file: your code's modules are found there first.
    _folder: Optional[Path] = PrivateAttr(default=None)

    @property
    def code_dirs(self) -> list[Path]:
        return [self._folder] if self._folder is not None else []

    def code_targets(self) -> list[tuple[str, str]]:
        """(key, package.module:attr) of every piece of your code this spec names."""
        named = [("model.name", self.model.name)]
        named += [(f"{k}.name", getattr(self, k).name) for k in ("objective", "transform", "eval_transform")
                  if getattr(self, k) is not None]
        named += [(f"metrics.{k}.name", m.name) for k, m in self.metrics.items()]
        return [(k, n) for k, n in named if ":" in n]

    def with_code_dirs(self, dirs: list[str]) -> "JobSpec":
        """This spec, finding its code in the first of `dirs` (a checkpoint's record)."""
        copy = self.model_copy()
        copy._folder = Path(dirs[0]) if dirs else None
        return copy

    @model_serializer(mode="wrap")
    def _unset_code_left_out(self, handler: SerializerFunctionWrapHandler) -> dict:
        # Keys of your code that are not set leave the dump, and the fingerprint of a job (what a
        # checkpoint must match to resume), as they were before these keys existed.
        out = handler(self)
        for k in ("objective", "transform", "eval_transform"):
            if k in out and out[k] is None:
                del out[k]
        if out.get("metrics") == {}:
            del out["metrics"]
        return out

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_output(v)

    @model_validator(mode="after")
    def _length(self) -> "JobSpec":
        if self.epochs is None and self.steps is None:
            raise ValueError("give epochs or steps")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.format(name=self.name))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def redacted_dump(self) -> dict:
        """The spec as JSON values, for files others may read (checkpoints, study records):
        slurm.env values are often tokens, and the job has them from its environment."""
        out = self.model_dump(mode="json")
        out["slurm"]["env"] = {k: REDACTED for k in out["slurm"]["env"]}
        return out

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: the model, optimizer, schedule and data
        it was trained with. Length, backend, output, logging and the slurm section (resources
        may change across a requeue) may change across a resume."""
        keep = self.model_dump(mode="json", include={"seed", "accumulate", "precision", "model", "optimizer",
                                                     "schedule", "data", "objective", "transform", "eval_transform",
                                                     "metrics"})
        keep["data"] = {k: keep["data"][k] for k in ("keys", "batch", "val_fraction", "shuffle", "drop_last",
                                                     "preprocess")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class CommandSpec(Strict):
    """What `mpidl submit -- CMD` needs besides the command: a name, the run folder (its SLURM
    logs), and the `slurm:` section of a job spec."""

    name: str = Field(default="job", description="the SLURM job's name (default: the script's, train.py -> train)")
    output: str = Field(default="runs/{name}", description="the run folder: the SLURM logs, and MPIDL_OUTPUT for an "
                                                           "array's elements")
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="what SLURM is asked for, as in a job spec")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_output(v)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.format(name=self.name))

def check_run_folders(spec: JobSpec) -> None:
    """BadInput when a file (or a broken link) stands where the run folder, the checkpoint
    folder or a folder above them would be: found late otherwise (the first record, or the
    first checkpoint after a whole epoch). Checks only; creates nothing."""
    own = spec.checkpoint.dir is not None
    for key, given, folder in (("output", spec.output, spec.run_dir),
                               ("checkpoint.dir" if own else "output", spec.checkpoint.dir if own else spec.output,
                                spec.checkpoint_dir)):
        p = folder
        while not (p.exists() or p.is_symlink()) and p != p.parent:
            p = p.parent
        if not p.is_dir():  # a file, or a link to nothing
            what = "a file" if p.exists() else "a broken link"
            tail = "not a folder" if p == folder else f"so the folder {folder} cannot be made"
            raise BadInput(f"{key} = {json.dumps(given)}: {p} is {what}, {tail}")


def read_spec_text(path: Union[str, Path]) -> str:
    """The job spec file's text; BadInput naming the file when it cannot be read."""
    return read_text(path, "job spec")


def load_command_spec(path: Optional[Union[str, Path]], overrides: Optional[list[str]] = None,
                      defaults: Optional[dict] = None) -> CommandSpec:
    """The resources of `mpidl submit -- CMD`: a YAML file with a `slurm:` section (and `name`,
    `output`), or none, then `overrides` (KEY.PATH=VALUE); one line on any problem."""
    origin = str(path) if path is not None else "mpidl submit"
    tree = dict(defaults or {})
    if path is not None:
        tree.update(read_yaml(path, "resources file (with a slurm: section)"))
    return validate(CommandSpec, apply_sets(tree, list(overrides or []), origin), origin)


def load_spec(path: Union[str, Path], overrides: Optional[list[str]] = None, text: Optional[str] = None) -> JobSpec:
    """Read and validate a job spec; BadInput with one line on any problem.

    text: the spec's YAML as read earlier (a submitted job keeps what was validated at
    submission); messages still name `path`.
    """
    origin = str(path)
    tree = parse_yaml(read_spec_text(path) if text is None else text, origin, "job spec")
    spec = validate(JobSpec, apply_sets(tree, list(overrides or []), origin), origin)
    spec._folder = Path(path).resolve().parent
    return spec
