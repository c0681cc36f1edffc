"""Your code, named in a job spec: `package.module:attr`, imported on every rank.

One spelling everywhere a spec takes code (`model`, `objective`, `transform`, `eval_transform`,
`metrics`): `name: mypkg.nets:ResNetish` (a class or a function of a module, `:` before the
attribute; dots after it reach into a class) with `args: {...}` for its keyword arguments.

Every rank imports the target by name, from the job file's folder first, then `PYTHONPATH`
(a compute node under srun, mpirun or submitit does the same: nothing of yours is pickled),
before anything is written. What can go wrong is one line naming the spec's key and the target:
a module that is not found, an import that raises (with the file and line it raised at), an
attribute that is missing, arguments the target does not take; a target that returns the wrong
kind of thing is named by its caller (`mpidl.train.models`: not an `nn.Module`).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from mpidl.errors import BadInput

TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_target(name: str) -> bool:
    """Whether `name` names code (`module:attr`) rather than a built-in."""
    return ":" in name


def check_syntax(name: str) -> str:
    """`name` if it is a well-formed target (for the schema: ValueError otherwise)."""
    if not TARGET.match(name):
        raise ValueError("a target is package.module:attr (a module path, ':', then a name in it)")
    return name


def search_path(folders: Iterable[Optional[Path]]) -> None:
    """Put `folders` (the job file's) first on sys.path, once each: the target's module is found
    there before PYTHONPATH, as a script's own folder is."""
    for folder in reversed([Path(f).resolve() for f in folders if f is not None]):
        text = str(folder)
        if text not in sys.path:
            sys.path.insert(0, text)


def _where(exc: BaseException) -> str:
    """file:line of the innermost frame of `exc` (where user code raised)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" ({Path(f.filename).name}:{f.lineno})"


def resolve(target: str, key: str, folders: Iterable[Optional[Path]] = ()) -> Any:
    """The object `target` names; BadInput (one line naming `key` and `target`) when it is not there."""
    search_path(folders)
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            where = ", ".join(str(Path(f).resolve()) for f in folders if f is not None)
            raise BadInput(f"{key}: {target}: no module named {missing!r} (looked in "
                           f"{where + ' and ' if where else ''}PYTHONPATH)") from None
        raise BadInput(f"{key}: {target}: importing {module_name} failed: {e}{_where(e)}") from None
    except BadInput:
        raise
    except BaseException as e:  # whatever the user's module raises at import
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BadInput(f"{key}: {target}: importing {module_name} raised {type(e).__name__}"
                       f"{': ' + first if first else ''}{_where(e)}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadInput(f"{key}: {target}: {module_name} has no attribute {attr_path!r}") from None
    return obj


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (or any keyword)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call(fn: Callable, args: Mapping[str, Any], key: str, target: str, *positional: Any) -> Any:
    """`fn(*positional, **args)`; BadInput naming `key` when `fn` does not take those arguments."""
    try:
        inspect.signature(fn).bind(*positional, **args)
    except TypeError as e:
        raise BadInput(f"{key}: {target}: {e}") from None
    except ValueError:
        pass  # no signature to check (a builtin): let the call say
    return fn(*positional, **args)


def two_argument(obj: Any, args: Mapping[str, Any], key: str, target: str, how: str) -> Callable:
    """`obj` ready to be called with two arguments, as `how` shows (e.g. "fn(output, target)"):
    a class is made with `args` (a loss module, a transform object), a function gets `args`
    bound. BadInput naming `key` when it cannot be."""
    if inspect.isclass(obj):
        return call(obj, args, f"{key}.args", target)
    if not callable(obj):
        raise BadInput(f"{key}.name: {target}: not a class or a function (a {type(obj).__name__})")
    try:
        inspect.signature(obj).bind(None, None, **args)
    except TypeError as e:
        raise BadInput(f"{key}.args: {target}: {e} (it is called as {how[:-1]}, **args))") from None
    except ValueError:
        pass  # no signature to check
    return functools.partial(obj, **args) if args else obj
