"""Reading a schema from YAML, for every schema mpidl has (job specs, studies, sweeps,
resources of `mpidl submit -- CMD`, published results): the strict base, the YAML dialect,
`--set key.path=value`, and the one-line error that names the file, the key and the value.

    tree = read_yaml(path, "study")                       # BadInput: not found, not YAML, not a mapping
    apply_sets(tree, ["slurm.nodes=2"], origin)           # --set items, read as YAML values
    study = validate(StudySpec, tree, origin)             # one line on the first problem

The "did you mean" hint of an unknown key searches the schema that refused it.
"""
from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mpidl.errors import BadInput

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    # allow_inf_nan=False: YAML reads .inf and .nan as floats, and no setting means either
    # (an infinite lr or warmup ends in an OverflowError mid-run). Every schema derives from this.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


# A name becomes one folder of a path (output's {name}) and a SLURM job name: nothing that
# leaves the folder (/ or ..), hides it (a leading dot), or that a shell, sbatch or SLURM's log
# patterns (%) would read.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,@-]{0,99}")
NAME_RULE = ("a name is one folder name: up to 100 ASCII letters, digits and _ . - + = , @, not starting with "
             ". - + = , @")


def check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(NAME_RULE)
    return value


def check_output(template: str) -> str:
    """An output template: {name} its only placeholder (`{{` and `}}` for braces), and no %:
    SLURM expands % in the log paths under the run folder (#SBATCH --output). Refused under
    `mpidl train` too: the folder a run starts in by hand is the one a submitted job continues."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        fields = [("", "", "")]  # a lone { or }
    if any(f != "name" or spec or conv for f, spec, conv in fields):
        raise ValueError("the only placeholder is {name} (write {{ and }} for literal braces)")
    if "%" in template:
        raise ValueError("% is refused: SLURM expands it in the log paths under the run folder (#SBATCH --output)")
    return template


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: `time: 1:30:00` stays the text SLURM expects
    (PyYAML's safe_load would read it as the integer 5400)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def quoted(value: str) -> str:
    """`value` as a YAML double-quoted scalar: `--set key=<this>` reads back exactly `value`
    (JSON's escapes, with characters beyond U+FFFF as YAML's \\U escapes, not surrogate pairs)."""
    def pair(m: re.Match) -> str:
        hi, lo = int(m.group(1), 16), int(m.group(2), 16)
        return f"\\U{0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00):08x}"

    return re.sub(r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})", pair, json.dumps(value))


def _set(tree: dict, dotted: str, raw: str, origin: str) -> None:
    """Apply one `key.path=value` override; the value is read as YAML (numbers, lists, ...)."""
    parts = dotted.split(".")
    if not all(parts):
        raise BadInput(f"{origin}: --set {dotted}={raw}: empty key in path")
    if "\n" in raw or "\r" in raw:  # YAML would fold it into a space, silently
        raise BadInput(f"{origin}: --set {dotted}={json.dumps(raw)}: a line break in a --set value "
                       "(YAML would read it as a space); write \\n inside double quotes if you mean one")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise BadInput(f"{origin}: --set {dotted}: '{p}' is a value, not a section")
        node = nxt
    try:
        node[parts[-1]] = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _one_line(e: ValidationError, origin: str, tree: dict, schema: Any) -> str:
    """The error a user should fix first, in one line: an unknown key (a typo) comes before
    the missing key it usually causes, and is named with the nearest valid key."""
    errors = e.errors()
    unknown = [err for err in errors if err["type"] == "extra_forbidden"]
    err = (unknown or errors)[0]
    parts = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
    loc = ".".join(parts)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        near = _nearest_key(parts, schema)
        hint = f" — did you mean '{'.'.join([*parts[:-1], near])}'?" if near else ""
        return f"{origin}: unknown key '{loc}'{hint}{more}"
    if err["type"] == "missing":
        return f"{origin}: missing key '{loc}'{more}"
    if not loc:
        return f"{origin}: {err['msg'].removeprefix('Value error, ')}"
    value = err.get("input")
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        shown = ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")  # as YAML writes them
    return f"{origin}: {loc} = {shown}: {err['msg'].removeprefix('Value error, ')}{more}"


def _nearest_key(parts: list[str], schema: Any) -> Optional[str]:
    """The valid key closest to the unknown last part of `parts`, in the section of `schema` it sits in."""
    import difflib

    section: Any = schema
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


def read_text(path: Union[str, Path], what: str = "job spec") -> str:
    """A file's text; BadInput naming the file when it cannot be read."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise BadInput(f"{path}: {what} not found") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read {what} ({e.strerror})") from None


def parse_yaml(text: str, origin: str, what: str) -> dict:
    """The mapping a YAML text holds (empty: {}); BadInput when it is not YAML or not a mapping."""
    try:
        tree = _yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise BadInput(f"{origin}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    if not isinstance(tree, dict):
        raise BadInput(f"{origin}: a {what} is a mapping of keys, got {type(tree).__name__}")
    return tree


def read_yaml(path: Union[str, Path], what: str) -> dict:
    return parse_yaml(read_text(path, what), str(path), what)


def apply_sets(tree: dict, overrides: list[str], origin: str) -> dict:
    """`key.path=value` items applied to `tree` in order (later wins)."""
    for item in overrides:
        if "=" not in item:
            raise BadInput(f"{origin}: --set expects key.path=value, got {item!r}")
        k, v = item.split("=", 1)
        _set(tree, k.strip(), v, origin)
    return tree


def validate(schema: type[M], tree: dict, origin: str) -> M:
    """`tree` as `schema`; BadInput with one line on the first problem."""
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise BadInput(_one_line(e, origin, tree, schema)) from None
