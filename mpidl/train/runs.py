"""A trained run as a model: its newest checkpoint, the job spec inside it, the model rebuilt.

Any mpidl run folder will do: its checkpoint holds the spec it was trained with, so the model
can be built again without the original YAML. Distillation (the teacher) and
`mpidl quantize` start here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from torch import nn

from mpidl.data import H5Source
from mpidl.errors import BadInput
from mpidl.spec import JobSpec
from mpidl.train import checkpoint
from mpidl.train.models import model_for


@dataclass
class TrainedRun:
    checkpoint: Path
    spec: JobSpec
    weights: dict
    global_step: int


def read_checkpoint(where: str, key: str) -> tuple[Path, dict]:
    """The newest checkpoint of a run folder (or its checkpoints folder) that reads, or the file
    given, with its contents."""
    path = Path(where)
    try:
        if path.is_file():
            return path, checkpoint.load(path, None)
        if not path.is_dir():
            raise BadInput(f"{where}: no such run folder or checkpoint file")
        for folder in (path / "checkpoints", path):
            found = checkpoint.load_newest(folder, None)
            if found is not None:
                return found
    except BadInput as e:
        raise BadInput(f"{key}: {e}") from None
    raise BadInput(f"{key}: {where}: no checkpoint (ckpt-*.pt) in {path / 'checkpoints'} or {path}")


def load_run(where: str, key: str) -> TrainedRun:
    """BadInput (naming `key` and the path) when there is no checkpoint or it is not mpidl's."""
    path, state = read_checkpoint(where, key)
    try:
        spec = JobSpec.model_validate(state["spec"]).with_code_dirs(state.get("code_dirs") or [])
    except (KeyError, ValidationError) as e:
        raise BadInput(f"{key}: {path}: the job spec it holds does not validate "
                       f"({str(e).splitlines()[0][:120]})") from None
    return TrainedRun(path, spec, state["model"], int(state.get("global_step", 0)))


def build_model(run: TrainedRun, source: H5Source, key: str) -> nn.Module:
    """The run's model for inputs shaped like `source`'s, with its trained weights, in eval mode."""
    model = model_for(run.spec, source)
    try:
        model.load_state_dict(run.weights)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise BadInput(f"{key}: {run.checkpoint}: its {run.spec.model.name} does not fit inputs of shape "
                       f"{source.shapes[source.keys[0]]} ({detail[:200]})") from None
    return model.eval()
