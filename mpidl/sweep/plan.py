"""A sweep file: the base job, the fields to vary, and the tasks they make.

    name: lr-width
    job: demo.yaml                   # the base job spec, relative to this file
    set: {epochs: 2}                 # every task (dotted keys, like `mpidl train --set`)
    grid:                            # every combination of these values
      optimizer.lr: [0.01, 0.05, 0.1]
      model.args.width: [16, 32]
    random:                          # and/or `trials` random draws (per grid combination)
      trials: 8
      seed: 0
      fields:
        optimizer.momentum: {uniform: [0.8, 0.99]}
        optimizer.weight_decay: {log_uniform: [1.0e-5, 1.0e-3]}
        data.batch: {integer: [16, 64]}
        model.name: {choice: [mlp, small_cnn]}
    metric: val_accuracy             # a key of the summary's `final`, or of the summary (a.b for nested)
    mode: max                        # max or min
    output: runs/sweeps/{name}

Every field path is checked against the job schema before anything runs; every task's spec is
validated too. A task is named by a hash of its resolved spec, so a sweep run again finds the
tasks it finished, and an edited sweep runs only what is new.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from mpidl.config import Strict, _one_line, check_name, check_output, read_yaml, validate
from mpidl.errors import BadInput
from mpidl.spec import JobSpec, load_spec

#: fields the sweep sets itself: each task is its own run, on a world of one rank
RESERVED = {"name": "each task is named by the sweep", "output": "each task writes under the sweep's output",
            "backend": "a task runs on one rank, where there is nothing to average",
            "checkpoint.dir": "each task keeps its checkpoints in its own folder"}


class Distribution(Strict):
    uniform: Optional[tuple[float, float]] = None
    log_uniform: Optional[tuple[float, float]] = None
    integer: Optional[tuple[int, int]] = Field(default=None, description="inclusive bounds")
    choice: Optional[list[Any]] = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> "Distribution":
        given = [k for k in ("uniform", "log_uniform", "integer", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, log_uniform, integer, choice")
        bounds = getattr(self, given[0])
        if given[0] != "choice" and bounds[0] > bounds[1]:
            raise ValueError(f"{given[0]}: low {bounds[0]} > high {bounds[1]}")
        if given[0] == "log_uniform" and bounds[0] <= 0:
            raise ValueError(f"log_uniform: bounds must be > 0, got {bounds[0]}")
        return self

    def draw(self, rng: np.random.Generator) -> Any:
        if self.uniform is not None:
            return float(rng.uniform(*self.uniform))
        if self.log_uniform is not None:
            lo, hi = self.log_uniform
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if self.integer is not None:
            return int(rng.integers(self.integer[0], self.integer[1] + 1))
        assert self.choice is not None  # _one: exactly one is given
        return self.choice[int(rng.integers(len(self.choice)))]


class RandomSpec(Strict):
    trials: int = Field(gt=0)
    seed: int = 0
    fields: dict[str, Distribution] = Field(min_length=1)


class SweepSpec(Strict):
    name: str = "sweep"
    job: str = Field(description="the base job spec, relative to the sweep file")
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    random: Optional[RandomSpec] = None
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    output: str = "runs/sweeps/{name}"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)  # and so every task's name, <name>-<id>

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_output(v)

    @property
    def out_dir(self) -> Path:
        return Path(self.output.format(name=self.name))


@dataclass
class Task:
    id: str
    index: int
    params: dict[str, Any]
    spec: JobSpec

    @property
    def label(self) -> str:
        return " ".join(f"{k}={json.dumps(v)}" for k, v in self.params.items()) or "(base job)"


_OPEN = object()  # a dict section (model.args): any key below it


def _section(annotation) -> Any:
    """The model (or _OPEN) a field's annotation nests, or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section(arg)
            if found is not None:
                return found
    if annotation is dict or origin is dict:
        return _OPEN
    return None


def check_field(dotted: str, where: str) -> None:
    """BadInput unless `dotted` names a field of the job schema that a sweep may vary."""
    if dotted in RESERVED:
        raise BadInput(f"{where}: '{dotted}' cannot be swept ({RESERVED[dotted]})")
    node: Any = JobSpec
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if node is _OPEN:
            return
        if not part or part not in node.model_fields:
            within = ".".join(parts[:i]) or "a job spec"
            raise BadInput(f"{where}: unknown field '{dotted}' ('{part}' is not a key of {within})")
        if i < len(parts) - 1:
            node = _section(node.model_fields[part].annotation)
            if node is None:
                raise BadInput(f"{where}: unknown field '{dotted}' ('{'.'.join(parts[:i + 1])}' is a value, "
                               "not a section)")


def _put(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *path, last = dotted.split(".")
    for p in path:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = copy.deepcopy(value)


def load(path: str) -> tuple[SweepSpec, list[Task]]:
    """The sweep and its tasks; BadInput (one line) on any problem, before anything runs."""
    origin = str(path)
    sweep = validate(SweepSpec, read_yaml(path, "sweep"), origin)
    for section, fields in (("set", sweep.set), ("grid", sweep.grid),
                            ("random.fields", sweep.random.fields if sweep.random else {})):
        for dotted in fields:
            check_field(dotted, f"{origin}: {section}")
    for dotted, values in sweep.grid.items():
        if not values:
            raise BadInput(f"{origin}: grid.{dotted} is an empty list: the sweep has no task")
    if not sweep.grid and sweep.random is None:
        raise BadInput(f"{origin}: empty sweep: give grid (fields and their values) or random (trials and fields)")

    job_path = Path(path).parent / sweep.job
    load_spec(job_path)  # the base job alone, with its own one-line errors
    base = read_yaml(job_path, "job spec")
    for dotted, value in sweep.set.items():
        _put(base, dotted, value)

    combos = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())]
    points: list[dict[str, Any]] = []
    if sweep.random is None:
        points = combos
    else:
        rng = np.random.default_rng(sweep.random.seed)
        for combo in combos:
            for _ in range(sweep.random.trials):
                points.append({**combo, **{k: d.draw(rng) for k, d in sweep.random.fields.items()}})

    out = sweep.out_dir
    tasks: list[Task] = []
    seen: set[str] = set()
    for params in points:
        index = len(tasks)
        tree_i = copy.deepcopy(base)
        for dotted, value in params.items():
            _put(tree_i, dotted, value)
        _put(tree_i, "backend", "mpi")
        _put(tree_i, "checkpoint.dir", None)
        try:
            spec = JobSpec.model_validate(tree_i)
        except ValidationError as e:
            shown = " ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
            raise BadInput(_one_line(e, f"{origin}: task {index} ({shown})", tree_i, JobSpec)) from None
        resolved = spec.model_dump(mode="json", exclude={"name", "output", "slurm"})  # resources: not the task
        tid = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:10]
        if tid in seen:  # a repeated grid value or random draw: the same job, run once
            continue
        seen.add(tid)
        folder = str(out / "tasks" / tid).replace("{", "{{").replace("}", "}}")
        spec = spec.model_copy(update={"name": f"{sweep.name}-{tid}", "output": folder})
        spec = spec.with_code_dirs([str(job_path.resolve().parent)])  # the base job's code, as train finds it
        tasks.append(Task(tid, index, params, spec))
    _check_shared_data(tasks, origin)
    return sweep, tasks


def _check_shared_data(tasks: list[Task], origin: str) -> None:
    """Tasks that share data files must agree on how to generate them (the first would win)."""
    synth: dict[str, tuple[int, Any]] = {}
    for t in tasks:
        files = t.spec.data.files
        if not isinstance(files, str) or t.spec.data.synth is None:
            continue
        recipe = t.spec.data.synth.model_dump()
        if files in synth and synth[files][1] != recipe:
            raise BadInput(f"{origin}: tasks {synth[files][0]} and {t.index} generate {files} with different "
                           "data.synth settings; sweep data.files with it")
        synth.setdefault(files, (t.index, recipe))
