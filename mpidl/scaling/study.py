"""StudySpec: the YAML schema of a scaling study, validated strictly on load.

    name: demo-weak
    job: jobs/demo.yaml             # paths are relative to where mpidl runs, as in job specs
    set: [data.val_fraction=0]      # --set overrides for every point
    # or your own script on mpidl.Run, instead of job and set:
    # command: [python, examples/mpidl_loop.py, data/example.h5]
    mode: weak                      # weak: fixed batch per rank; strong: fixed global batch
    sizes: [1, 2, 4]
    batch_per_rank: 64              # weak (default: the job's data.batch); strong: global_batch
    warmup_steps: 20                # not measured
    steps: 100                      # measured, in windows of `window` steps (the trainer's log_every)
    window: 10
    repetitions: 3
    backends: [horovod, ddp, mpi]
    baseline: true                  # also the no-communication baseline (backend none) at every size
    launcher: {name: mpirun, args: []}
    # or, one SLURM job per point, each size at every node count that divides it:
    # launcher: {name: slurm, nodes: [1, 2], partition: debug}
    predict: {inter: IB-100, library: nccl}   # the model's assumptions (PredictSpec)
    report: {epochs: 90, target: 256}         # what the report's summary prices and projects

COMMANDS: a study of your own script runs `command` on every rank of each point with what the
point fixes in the environment, which `mpidl.Run` takes over what the script says: MPIDL_BACKEND
(the backend, `none` for the baseline), MPIDL_OUTPUT (the point's run folder), MPIDL_STEPS
(warmup_steps + steps) and MPIDL_LOG_EVERY (window); MPIDL_BATCH_PER_RANK is the point's batch
per rank for the script to read (a strong study needs it read). The figures come from the
records the Run writes, as for a job.

Unknown keys, wrong types and impossible values give one line naming the file, the key and
the value (BadInput, exit 2), as job specs do. `runner.check_feasible` then refuses, before anything
runs, sizes the batch or the data cannot serve and backends that are not installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from mpidl.config import Strict, check_name, check_output, read_yaml, validate
from mpidl.scaling.efficiency import BASELINE
from mpidl.spec import JobSpec, load_spec


class LauncherSpec(Strict):
    """How ranks start: `mpirun` on this machine, or `slurm`: one job per point through `mpidl submit
    --wait` (srun --mpi=pmix), placed on each node count in `nodes` that divides the point's size."""

    name: Literal["mpirun", "slurm"] = "mpirun"
    args: list[str] = Field(default_factory=list, description="mpirun: extra arguments, e.g. [--bind-to, core]")
    nodes: list[int] = Field(default_factory=lambda: [1], min_length=1,
                             description="node counts; each size runs at every count that divides it (slurm)")
    partition: Optional[str] = Field(default=None, description="slurm: default the job's slurm.partition, "
                                                               "else the cluster's default partition")

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: list[int], info) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("node counts are >= 1")
        if len(set(v)) != len(v):
            raise ValueError("each node count once")
        if info.data.get("name") == "mpirun" and v != [1]:
            raise ValueError("more than one node needs name: slurm (mpirun starts ranks on this machine only)")
        return sorted(v)

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str], info) -> list[str]:
        if v and info.data.get("name") == "slurm":
            raise ValueError("args are mpirun's; the slurm launcher takes its resources from the job's slurm: "
                             "section (set slurm.* in the study's set)")
        return v

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: Optional[str], info) -> Optional[str]:
        if v is not None and info.data.get("name") != "slurm":
            raise ValueError("partition is for name: slurm")
        return v


class LinkSpec(Strict):
    alpha_s: float = Field(ge=0, description="latency per message step, seconds")
    bandwidth_GBps: float = Field(gt=0, description="bus bandwidth of the link, GB/s (1e9 bytes/s)")


class PredictSpec(Strict):
    """What the report's prediction beyond the measured sizes assumes (see mpidl.scaling.model)."""

    ranks_per_node: Optional[int] = Field(default=None, ge=1,
                                          description="default: the measured machine's cores or GPUs")
    intra: Union[str, LinkSpec] = Field(default="measured",
                                        description="'measured', a preset name, or {alpha_s, bandwidth_GBps}")
    inter: Union[str, LinkSpec] = "IB-100"
    nics_per_node: int = Field(default=1, ge=1)
    overlap: float = Field(default=2 / 3, ge=0, le=1, description="share of compute that can hide communication")
    bucket_mb: float = Field(default=25, gt=0, description="the last bucket's size (it cannot overlap)")
    bytes_per_param: int = Field(default=4, ge=1)
    max_ranks: int = Field(default=4096, ge=1)
    library: Optional[Literal["nccl", "mpi"]] = Field(
        default=None, description="whose allreduce algorithms and costs; default mpi where a link is measured, "
                                  "else nccl")
    algorithms: Optional[list[Literal["ring", "tree", "hierarchical", "torus2d", "recursive_doubling",
                                      "rabenseifner"]]] = Field(default=None, min_length=1)
    cycle_ms: float = Field(default=0, ge=0, description="tensor fusion's cycle (Horovod); 0: a call per full bucket")
    jitter_cv: Union[Literal["measured"], float] = Field(
        default="measured", description="σ of a rank's step time for stragglers: 'measured' (the 1-rank windows' "
                                        "spread) or a number 0 … 1")

    @field_validator("jitter_cv")
    @classmethod
    def _jitter(cls, v):
        if not isinstance(v, str) and not 0 <= v <= 1:
            raise ValueError("σ is a share of the step time, 0 … 1, or 'measured'")
        return v


class ReportSpec(Strict):
    """What the report's summary prices and projects (mpidl report's --samples, --epochs, --target override)."""

    samples: Optional[float] = Field(default=None, gt=0, description="samples to train, for the cost")
    epochs: Optional[float] = Field(default=None, gt=0, description="epochs to train (× samples_per_epoch)")
    samples_per_epoch: Optional[int] = Field(default=None, gt=0,
                                             description="default: the job's synthetic rows less validation")
    target: Optional[int] = Field(default=None, ge=1, description="a size to project to, in ranks")

    @model_validator(mode="after")
    def _one(self) -> "ReportSpec":
        if self.samples is not None and self.epochs is not None:
            raise ValueError("give samples or epochs, not both")
        return self


class StudySpec(Strict):
    name: str
    job: Optional[str] = Field(default=None, description="a job spec; or give command")
    command: Optional[list[str]] = Field(default=None, description="your script, run on every rank "
                                                                   "(e.g. [python, train.py]): see COMMANDS")
    set: list[str] = Field(default_factory=list)
    mode: Literal["strong", "weak"]
    sizes: list[int] = Field(min_length=1)
    batch_per_rank: Optional[int] = Field(default=None, gt=0)
    global_batch: Optional[int] = Field(default=None, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    steps: int = Field(default=100, gt=0)
    window: int = Field(default=10, gt=0)
    repetitions: int = Field(default=3, ge=1)
    backends: list[Literal["horovod", "ddp", "mpi"]] = Field(min_length=1)
    baseline: bool = True
    threads_per_rank: int = Field(default=1, ge=0, description="OMP_NUM_THREADS per rank (0: leave unset)")
    launcher: LauncherSpec = Field(default_factory=LauncherSpec)
    timeout_s: float = Field(default=1800, gt=0, description="per run")
    output: str = "runs/scale/{name}"
    allreduce: Optional[str] = Field(default=None, description="a bench_allreduce JSON to show in the report")
    flag_below: float = Field(default=0.8, ge=0, le=1, description="flag points whose efficiency is below this")
    predict: PredictSpec = Field(default_factory=PredictSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)  # and so every run's, <name>-<point>

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_output(v)

    @model_validator(mode="after")
    def _consistent(self) -> "StudySpec":
        if (self.job is None) == (self.command is None):
            raise ValueError("give job (a job spec) or command (your script), one of them")
        if self.command is not None:
            if not self.command:
                raise ValueError("command: an empty command")
            if self.set:
                raise ValueError("set: --set items are for a job spec; a command takes its own arguments")
            if self.mode == "weak" and self.batch_per_rank is None:
                raise ValueError("batch_per_rank: a weak study of a command states the batch its script takes "
                                 "(MPIDL_BATCH_PER_RANK passes it on)")
        if any(p < 1 for p in self.sizes):
            raise ValueError(f"sizes: every size is >= 1, got {self.sizes}")
        if len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes: each size once, got {self.sizes}")
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends: each backend once, got {self.backends}")
        if self.mode == "weak" and self.global_batch is not None:
            raise ValueError("global_batch is for mode strong; a weak study fixes batch_per_rank")
        if self.mode == "strong" and self.batch_per_rank is not None:
            raise ValueError("batch_per_rank is for mode weak; a strong study fixes global_batch")
        if self.mode == "strong" and self.global_batch is None:
            raise ValueError("mode strong needs global_batch (samples per step over all ranks)")
        for key in ("warmup_steps", "steps"):
            if getattr(self, key) % self.window:
                raise ValueError(f"{key} = {getattr(self, key)} is not a multiple of window = {self.window}")
        nodes = self.launcher.nodes
        for p in self.sizes:
            if not any(p % n == 0 for n in nodes):
                raise ValueError(f"sizes: {p} ranks cannot be spread evenly over any of launcher.nodes {nodes} "
                                 "(each size runs at every node count that divides it)")
        for n in nodes:
            if not any(p % n == 0 for p in self.sizes):
                raise ValueError(f"launcher.nodes: {n} nodes divide none of the sizes {self.sizes}")
        return self

    @property
    def runs(self) -> list[str]:
        """The backends run at every size: the study's, then the no-communication baseline."""
        return [*self.backends, *([BASELINE] if self.baseline else [])]

    def node_counts(self, size: int) -> list[int]:
        """The placements of `size` ranks: every node count of the launcher that divides it."""
        return [n for n in self.launcher.nodes if size % n == 0]


class Study:
    """A validated study with its paths resolved and its job spec loaded (None for a command)."""

    def __init__(self, spec: StudySpec, origin: Path):
        self.spec = spec
        self.origin = origin
        self.job_path = Path(spec.job).expanduser() if spec.job else None
        # BadInput names the job file
        self.job: Optional[JobSpec] = load_spec(self.job_path, spec.set) if self.job_path else None
        self.command = list(spec.command) if spec.command else None
        self.output = Path(spec.output.format(name=spec.name))
        self.allreduce = Path(spec.allreduce).expanduser() if spec.allreduce else None

    @property
    def what(self) -> str:
        """What the study measures, for its report: the job file, or the command."""
        return str(self.job_path) if self.job_path else " ".join(self.command or [])

    def batch_per_rank(self, size: int) -> int:
        s = self.spec
        if s.mode == "weak":
            if s.batch_per_rank is not None:
                return s.batch_per_rank
            assert self.job is not None  # a command study states it
            return self.job.data.batch
        assert s.global_batch is not None
        return s.global_batch // size

    def global_batch(self, size: int) -> int:
        return self.batch_per_rank(size) * size


def load_study(path: Union[str, Path]) -> Study:
    """Read and validate a study; BadInput with one line on any problem."""
    origin = Path(path)
    spec = validate(StudySpec, read_yaml(origin, "study"), str(origin))
    return Study(spec, origin)
