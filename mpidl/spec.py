"""JobSpec: the YAML schema of a training job, validated strictly on load.

Unknown keys, wrong types and impossible values give one line naming the file, the key
path and the value (BadInput, exit 2). `--set a.b=c` overrides go through the same checks.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError,
                      model_serializer, model_validator)

from mpidl.errors import BadInput


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SynthSpec(Strict):
    """Generate the data files when they are missing (the demo's embedded default)."""

    kind: Literal["images", "tabular"]
    rows: int = Field(gt=0)
    classes: Optional[int] = Field(default=None, ge=2)
    channels: int = Field(default=3, ge=1)
    size: int = Field(default=16, ge=1)
    features: int = Field(default=16, ge=1)
    rule: Literal["linear", "nonlinear"] = "linear"
    noise: Optional[float] = Field(default=None, ge=0)
    seed: int = 0


class PreprocessSpec(Strict):
    scale_uint8: bool = True
    standardize: bool = False
    standardize_per: Literal["feature", "channel"] = "feature"
    crop: Optional[int] = Field(default=None, ge=1)
    padding: int = Field(default=0, ge=0)
    flip: bool = False


class DataSpec(Strict):
    files: Union[str, list[str]]
    keys: list[str] = Field(default_factory=lambda: ["x", "y"], min_length=2)
    batch: int = Field(gt=0, description="samples per rank per step")
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    val_files: Optional[Union[str, list[str]]] = None
    shuffle: Literal["block", "exact", "none"] = "block"
    drop_last: bool = True
    prefetch: int = Field(default=4, ge=1)
    stage_dir: Optional[str] = None
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    synth: Optional[SynthSpec] = None


class ModelSpec(Strict):
    name: Literal["linear", "mlp", "small_cnn", "resnet18", "resnet50", "mobilenet_v2"]
    args: dict[str, Any] = Field(default_factory=dict)
    channels_last: bool = False
    compile: bool = False


class ClipWeightsSpec(Strict):
    """After every optimizer step: each parameter into [min, max] (WGAN critics), or each
    weight's rows (one output unit's incoming weights) to an L2 norm of at most max_norm."""

    min: Optional[float] = None
    max: Optional[float] = None
    max_norm: Optional[float] = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_kind(self) -> "ClipWeightsSpec":
        ranged = self.min is not None or self.max is not None
        if ranged and (self.min is None or self.max is None):
            raise ValueError("give both min and max")
        if ranged == (self.max_norm is not None):
            raise ValueError("give min and max, or max_norm")
        if ranged and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad_norm: Optional[float] = Field(default=None, gt=0,
                                            description="global L2 norm of the averaged gradient, at most")
    clip_weights: Optional[ClipWeightsSpec] = None

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
    warmup_epochs: float = Field(default=0.0, ge=0)
    kind: Literal["constant", "cosine", "step"] = "constant"
    step_epochs: float = Field(default=30, gt=0)
    gamma: float = Field(default=0.1, gt=0, le=1)
    min_lr: float = Field(default=0.0, ge=0)


class HorovodSpec(Strict):
    compression: Literal["none", "fp16"] = "none"
    op: Literal["average", "adasum"] = "average"
    fusion_threshold_mb: Optional[float] = Field(default=None, ge=0)
    cycle_time_ms: Optional[float] = Field(default=None, gt=0)


class DDPSpec(Strict):
    bucket_cap_mb: float = Field(default=25, gt=0)


class MPISpec(Strict):
    bucket_mb: float = Field(default=25, gt=0)


class CheckpointSpec(Strict):
    dir: Optional[str] = None
    every_steps: Optional[int] = Field(default=None, gt=0)
    every_epochs: Optional[int] = Field(default=1, gt=0)
    keep: int = Field(default=2, ge=1)


class DistillSpec(Strict):
    """Knowledge distillation: loss = alpha·T²·KL(teacher ‖ student at temperature T) + (1 − alpha)·CE."""

    teacher: str = Field(description="a trained run folder (or one checkpoint file); its checkpoint holds its spec")
    alpha: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)


class JobSpec(Strict):
    name: str = "job"
    seed: int = 0
    epochs: Optional[int] = Field(default=None, gt=0)
    steps: Optional[int] = Field(default=None, gt=0, description="stop after this many optimizer steps")
    accumulate: int = Field(default=1, ge=1, description="batches per optimizer step")
    precision: Literal["fp32", "bf16"] = "fp32"
    backend: Literal["horovod", "ddp", "mpi", "none"] = "horovod"
    horovod: HorovodSpec = Field(default_factory=HorovodSpec)
    ddp: DDPSpec = Field(default_factory=DDPSpec)
    mpi: MPISpec = Field(default_factory=MPISpec)
    data: DataSpec
    model: ModelSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    output: str = "runs/{name}"
    log_every: int = Field(default=20, gt=0)
    timing: Literal["sync", "off"] = Field(default="sync", description="synchronise CUDA to split step time")
    target_accuracy: Optional[float] = Field(default=None, gt=0, le=1, description="reported, not enforced")
    distill: Optional[DistillSpec] = None

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

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed: the model, optimizer, schedule and data
        it was trained with. Length, backend, output and logging may change across a resume."""
        keep = self.model_dump(mode="json", include={"seed", "accumulate", "precision", "model", "optimizer",
                                                     "schedule", "data"})
        keep["data"] = {k: keep["data"][k] for k in ("keys", "batch", "val_fraction", "shuffle", "drop_last",
                                                     "preprocess")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _set(tree: dict, dotted: str, raw: str, origin: str) -> None:
    """Apply one `key.path=value` override; the value is read as YAML (numbers, lists, ...)."""
    parts = dotted.split(".")
    if not all(parts):
        raise BadInput(f"{origin}: --set {dotted}={raw}: empty key in path")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise BadInput(f"{origin}: --set {dotted}: '{p}' is a value, not a section")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _one_line(e: ValidationError, origin: str, tree: dict) -> str:
    """The error a user should fix first, in one line: an unknown key (a typo) comes before
    the missing key it usually causes, and is named with the nearest valid key."""
    errors = e.errors()
    unknown = [err for err in errors if err["type"] == "extra_forbidden"]
    err = (unknown or errors)[0]
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
    loc = ".".join(parts)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        near = _nearest_key(parts)
        hint = f" — did you mean '{'.'.join([*parts[:-1], near])}'?" if near else ""
        return f"{origin}: unknown key '{loc}'{hint}{more}"
    if err["type"] == "missing":
        return f"{origin}: missing key '{loc}'{more}"
    if not loc:
        return f"{origin}: {err['msg'].removeprefix('Value error, ')}"
    value = err.get("input")
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return f"{origin}: {loc} = {shown}: {err['msg']}{more}"


def _nearest_key(parts: list[str]) -> Optional[str]:
    """The valid key closest to the unknown last part of `parts`, in the section it sits in."""
    import difflib

    section: Any = JobSpec
    for name in parts[:-1]:
        field = section.model_fields.get(name) if isinstance(section, type) and issubclass(section, BaseModel) \
            else None
        if field is None:
            return None
        section = _section_model(field.annotation)
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return None
    found = difflib.get_close_matches(parts[-1], list(section.model_fields), n=1, cutoff=0.6)
    return found[0] if found else None


def _section_model(annotation: Any) -> Any:
    """The pydantic model inside Optional[...] or Union[...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        model = _section_model(arg)
        if model is not None:
            return model
    return None


def load_spec(path: Union[str, Path], overrides: Optional[list[str]] = None) -> JobSpec:
    """Read and validate a job spec; BadInput with one line on any problem."""
    origin = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise BadInput(f"{origin}: job spec not found") from None
    except OSError as e:
        raise BadInput(f"{origin}: cannot read job spec ({e.strerror})") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise BadInput(f"{origin}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise BadInput(f"{origin}: a job spec is a mapping of keys, got {type(tree).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise BadInput(f"{origin}: --set expects key.path=value, got {item!r}")
        k, v = item.split("=", 1)
        _set(tree, k.strip(), v, origin)
    try:
        return JobSpec.model_validate(tree)
    except ValidationError as e:
        raise BadInput(_one_line(e, origin, tree)) from None
