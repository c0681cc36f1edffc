"""`mpidl setup horovod`: Horovod 0.28.1 built from its source package with the fixes today's
toolchains need, for the CUDA architectures the installed torch targets, cached as a wheel and
installed into the Python environment that runs it.

The one build path: scripts/setup.sh calls this command, and a pip-installed mpidl runs it alone
(`pip install mpidl[horovod]` would build the unpatched 0.28.1, which fails on GCC 13, CMake 4 and
PyTorch >= 2.1). Three steps, each testable without building:

- `gather()` reads the machine: torch and its CUDA architectures, nvcc, NCCL's headers, the GPUs;
- `plan(facts)` decides, as a pure function: NCCL or CPU build, the architecture list and where it
  came from, Horovod's build variables, the wheel cache key (the architectures are part of it, so
  a wheel built for others is never reused);
- `execute(plan)` installs: nothing when the Horovod installed is the one planned, else the cached
  wheel, else a build (about 2 minutes on 16 cores) that fills the cache.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from mpidl.errors import BadInput, Fault
from mpidl.install.cuda import Kernels, arch_numbers, cap_number, cap_text, missed, package_kernels, parse_cc_list

VERSION = "0.28.1"
CC_VAR = "HOROVOD_BUILD_CUDA_CC_LIST"
INSTALL_DOC = "docs/install.md in mpidl's repository"
# What building needs in this environment (setup.py imports torch, so no isolated build; cffi, else
# Horovod's setup_requires fetches it past pip and its --no-index), and what Horovod declares at run time.
BUILD_REQUIRES = ["setuptools>=61", "wheel", "cffi"]
RUNTIME_REQUIRES = ["cffi", "cloudpickle", "psutil", "pyyaml", "packaging"]
# PyTorch >= 2.1 needs C++17; 0.28.1 hard-codes C++14 (fixed upstream after 0.28.1, never released).
# CXXFLAGS=-std=c++17 does not work: CMake appends its own -std=c++14 after it.
PATCHES = [("CMakeLists.txt", "CMAKE_CXX_STANDARD 14", "CMAKE_CXX_STANDARD 17"),
           ("horovod/torch/CMakeLists.txt", "CMAKE_CXX_STANDARD 14", "CMAKE_CXX_STANDARD 17")]
# GCC 13 no longer pulls these in transitively; being headers, they survive CMake's -std.
FORCE_INCLUDES = " ".join(f"-include {h}" for h in
                          ("string", "cstdint", "stdexcept", "memory", "limits", "algorithm", "functional"))
# The environment variables a plan reads (all others are irrelevant to what is built).
ENV_READ = (CC_VAR, "HOROVOD_CUDA_HOME", "CUDA_HOME", "HOROVOD_NCCL_HOME", "HOROVOD_NCCL_INCLUDE", "NCCL_HOME",
            "MAKEFLAGS", "CXXFLAGS")


def say(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where built wheels and the Horovod source live (scripts/setup.sh's MPIDL_CACHE)."""
    if env.get("MPIDL_CACHE"):
        return Path(env["MPIDL_CACHE"]).expanduser()
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpidl"


# ---------------------------------------------------------------- what this machine has
@dataclass
class Facts:
    python: str                               # "311"
    torch: str                                # "2.13.0+cpu"
    torch_cuda: Optional[str]                 # "12.6"; None: torch is a CPU build
    torch_archs: list = field(default_factory=list)  # what torch's own kernels are compiled for: [70, 80, 90]
    gpus: list = field(default_factory=list)  # this node's GPUs: [(8, 0), (8, 0)]
    nvcc: Optional[str] = None                # the nvcc Horovod's build would use
    nvcc_on_path: bool = False                # found on PATH (else the build is told where)
    nvcc_release: Optional[str] = None        # "12.6"
    nvcc_archs: list = field(default_factory=list)  # what that nvcc compiles for; [] unknown
    nccl_header: Optional[str] = None         # the nccl.h found
    cpus: int = 1
    env: dict = field(default_factory=dict)   # ENV_READ, where set


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def find_nvcc(env: Mapping[str, str]) -> Optional[str]:
    """nvcc as Horovod's build looks for it: on PATH, then $HOROVOD_CUDA_HOME/bin, then
    $CUDA_HOME/bin, then /usr/local/cuda/bin."""
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    for root in (env.get("HOROVOD_CUDA_HOME"), env.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(Path(root) / "bin" / "nvcc", os.X_OK):
            return str(Path(root) / "bin" / "nvcc")
    return None


def find_nccl_header(env: Mapping[str, str], nvcc: Optional[str]) -> Optional[str]:
    """nccl.h where Horovod's FindNCCL looks (its variables, the CUDA toolkit, the system), and
    under NCCL_HOME, which site modules set and the build then passes on as HOROVOD_NCCL_HOME."""
    places = [env.get("HOROVOD_NCCL_INCLUDE")]
    places += [str(Path(env[v]) / "include") for v in ("HOROVOD_NCCL_HOME", "NCCL_HOME") if env.get(v)]
    if nvcc:
        places.append(str(Path(nvcc).resolve().parent.parent / "include"))
    places += ["/usr/include", "/usr/local/include"]
    for place in places:
        if place and (Path(place) / "nccl.h").is_file():
            return str(Path(place) / "nccl.h")
    return None


def gather(env: Mapping[str, str] = os.environ) -> Facts:
    """Read this machine. Needs torch importable (Horovod's build imports it too)."""
    try:
        import torch
    except ImportError as e:
        raise Fault(f"torch is not importable here ({e}): install torch first, a CUDA build for GPU nodes "
                    f"(see 'A CUDA build of torch' in {INSTALL_DOC})") from None
    cuda = torch.version.cuda
    archs: list[int] = []
    if cuda:
        # Compiled into torch: readable without a GPU (older torch's get_arch_list() returns []
        # on a login node without one).
        flags = getattr(torch._C, "_cuda_getArchFlags", None)
        archs = arch_numbers((flags() if flags else None) or " ".join(torch.cuda.get_arch_list()))
    gpus = [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())] \
        if cuda and torch.cuda.is_available() else []
    nvcc = find_nvcc(env)
    release = nvcc_archs = None
    if nvcc:
        m = re.search(r"release (\d+\.\d+)", _run([nvcc, "--version"]))
        release = m.group(1) if m else None
        # Only the sm_ codes: --list-gpu-code (CUDA >= 11), else what --help lists, as Horovod reads it.
        nvcc_archs = arch_numbers(" ".join(re.findall(r"sm_\d+", _run([nvcc, "--list-gpu-code"])
                                                      or _run([nvcc, "--help"]))))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return Facts(python="%d%d" % sys.version_info[:2], torch=torch.__version__, torch_cuda=cuda, torch_archs=archs,
                 gpus=[(int(a), int(b)) for a, b in gpus], nvcc=nvcc,
                 nvcc_on_path=nvcc == shutil.which("nvcc", path=env.get("PATH")),
                 nvcc_release=release,
                 nvcc_archs=nvcc_archs or [], nccl_header=find_nccl_header(env, nvcc), cpus=cpus,
                 env={k: env[k] for k in ENV_READ if env.get(k)})


# ---------------------------------------------------------------- what to build
@dataclass
class Plan:
    facts: Facts
    cuda: bool                  # Horovod's CUDA kernels are compiled (a CUDA torch and nvcc)
    nccl: bool                  # ... and GPU collectives go through NCCL
    archs: list                 # the CUDA architectures compiled for ([] without CUDA)
    arch_source: str            # where that list came from
    env: dict                   # Horovod's build variables
    key: str                    # the wheel cache's key
    notes: list = field(default_factory=list)  # what the user should know about this build

    @property
    def kernels(self) -> Kernels:
        """What the build will carry: Horovod compiles machine code for each architecture and
        PTX for the highest (cmake/build_utils.py)."""
        return Kernels(frozenset(self.archs), frozenset(self.archs[-1:]))

    @property
    def label(self) -> str:
        if not self.cuda:
            return "cpu, MPI, Gloo"
        return f"cuda{self.facts.torch_cuda}, MPI" + (", NCCL" if self.nccl else ", Gloo") + \
            f", CUDA architectures {','.join(map(str, self.archs))}"


def plan(facts: Facts) -> Plan:
    """What to build on a machine with these facts (pure: tests give facts of machines they are not)."""
    env = facts.env
    notes: list[str] = []
    cuda = bool(facts.torch_cuda and facts.nvcc)
    if not facts.torch_cuda and (facts.nvcc or facts.nccl_header):
        here = " and ".join(w for w, ok in (("nvcc", facts.nvcc), ("NCCL", facts.nccl_header)) if ok)
        notes.append(f"{here} found, but torch {facts.torch} is a CPU build: building Horovod for CPUs. "
                     "The NCCL build GPU nodes need is made with a CUDA build of torch in this environment "
                     f"(one installs and imports without a GPU: see 'A CUDA build of torch' in {INSTALL_DOC})")
    elif facts.torch_cuda and not facts.nvcc:
        notes.append(f"torch {facts.torch} is a CUDA build, but nvcc is not found (PATH, HOROVOD_CUDA_HOME, "
                     "CUDA_HOME, /usr/local/cuda): building Horovod for CPUs; for GPUs load the CUDA toolkit "
                     "(`module load cuda`, names vary by site) and run again")
    nccl = bool(cuda and facts.nccl_header)
    if cuda and not nccl:
        notes.append("NCCL's headers are not found (nccl.h under HOROVOD_NCCL_INCLUDE, HOROVOD_NCCL_HOME, NCCL_HOME, "
                     "the CUDA toolkit or /usr/include): building without NCCL, so GPU tensors would be reduced "
                     "through MPI; `module load nccl` or `export NCCL_HOME=...` and run again")

    archs: list[int] = []
    source = ""
    if cuda:
        archs, source = _archs(facts, notes)

    build = {
        "HOROVOD_WITH_PYTORCH": "1", "HOROVOD_WITHOUT_TENSORFLOW": "1", "HOROVOD_WITHOUT_MXNET": "1",
        "HOROVOD_WITH_MPI": "1",
        "CMAKE_POLICY_VERSION_MINIMUM": "3.5",  # the bundled Gloo asks for CMake 2.8; CMake 4 refuses
        "MAKEFLAGS": env.get("MAKEFLAGS") or f"-j{facts.cpus}",
        "CXXFLAGS": " ".join(filter(None, (FORCE_INCLUDES, env.get("CXXFLAGS")))),
    }
    if nccl:
        # With NCCL, Gloo is left out: Horovod runs over MPI, as mpidl runs it anyway.
        build.update(HOROVOD_GPU_OPERATIONS="NCCL", HOROVOD_NCCL_LINK="SHARED", HOROVOD_WITHOUT_GLOO="1")
        if env.get("NCCL_HOME") and not env.get("HOROVOD_NCCL_HOME"):
            build["HOROVOD_NCCL_HOME"] = env["NCCL_HOME"]  # Horovod reads only its own variable
    else:
        build.update(HOROVOD_WITH_GLOO="1", HOROVOD_GPU_OPERATIONS="", HOROVOD_GPU="")
    if cuda:
        build[CC_VAR] = ",".join(map(str, archs))
        assert facts.nvcc is not None
        if not facts.nvcc_on_path:
            # Found off PATH: make Horovod's CMake and torch's CUDA_HOME use that same toolkit.
            root = str(Path(facts.nvcc).parent.parent)
            build["HOROVOD_CUDA_HOME"] = env.get("HOROVOD_CUDA_HOME", root)
            if not env.get("CUDA_HOME"):
                build["CUDA_HOME"] = root

    key = f"py{facts.python}-torch{facts.torch.replace('+', '_')}-"
    if cuda:
        key += f"cuda{facts.torch_cuda}-{'nccl' if nccl else 'mpi'}-sm{'_'.join(map(str, archs))}"
    else:
        key += "cpu"  # as earlier set-ups named it: their CPU wheels stay valid
    return Plan(facts, cuda, nccl, archs, source, build, key, notes)


def _archs(facts: Facts, notes: list[str]) -> tuple[list[int], str]:
    """The CUDA architectures to compile for: the user's list, else torch's, else the GPUs here."""
    supported = set(facts.nvcc_archs)
    nvcc_name = f"nvcc {facts.nvcc_release or ''}".strip()
    if facts.env.get(CC_VAR):
        archs = parse_cc_list(facts.env[CC_VAR], CC_VAR)
        bad = [a for a in archs if supported and a not in supported]
        if bad:
            raise BadInput(f"{CC_VAR}={facts.env[CC_VAR]}: {nvcc_name} cannot compile for "
                           f"{','.join(map(str, bad))}; it can for {','.join(map(str, sorted(supported)))}")
        source = f"{CC_VAR}, as set"
    elif facts.torch_archs:
        archs = [a for a in facts.torch_archs if not supported or a in supported]
        dropped = sorted(set(facts.torch_archs) - set(archs))
        if dropped:
            notes.append(f"{nvcc_name} cannot compile for {','.join(map(str, dropped))} (torch lists them): left out, "
                         "so GPUs of those capabilities get no Horovod kernel; an older CUDA toolkit keeps them")
        if not archs:
            raise Fault(f"{nvcc_name} can compile for none of torch {facts.torch}'s CUDA architectures "
                        f"({','.join(map(str, facts.torch_archs))}): load the CUDA toolkit torch was built with "
                        f"(CUDA {facts.torch_cuda})")
        source = f"torch {facts.torch}'s architectures"
    elif facts.gpus:
        archs = sorted({cap_number(c) for c in facts.gpus})
        source = "the GPUs on this node (torch lists no architectures)"
    else:
        raise Fault(f"no CUDA architecture to build for: torch {facts.torch} lists none and no GPU is visible; "
                    f"set {CC_VAR}, e.g. {CC_VAR}=80,90 for A100 and H100")
    if facts.nvcc_release and facts.torch_cuda and facts.nvcc_release.split(".")[0] != facts.torch_cuda.split(".")[0]:
        notes.append(f"{nvcc_name} and torch's CUDA {facts.torch_cuda} differ in major version: load the CUDA "
                     "toolkit matching torch's if the build fails")
    kernels = Kernels(frozenset(archs), frozenset(archs[-1:]))
    for cap in missed(kernels, facts.gpus):
        notes.append(f"this node's GPU (compute capability {cap_text(cap_number(cap))}) is not among them: "
                     f"Horovod's kernels would not run here; add it to {CC_VAR}")
    return archs, source


def describe(p: Plan) -> list[str]:
    """The plan, as the set-up prints it."""
    f = p.facts
    lines = [f"Horovod {VERSION} for Python {f.python[0]}.{f.python[1:]}, torch {f.torch}"
             + (f" (CUDA {f.torch_cuda})" if f.torch_cuda else " (CPU)")]
    if p.cuda:
        lines.append(f"{'NCCL build' if p.nccl else 'CUDA build without NCCL'}: nvcc {f.nvcc_release or '?'} "
                     f"({f.nvcc})" + (f", NCCL {f.nccl_header}" if p.nccl else ""))
        lines.append(f"CUDA architectures {','.join(map(str, p.archs))}: from {p.arch_source}"
                     + ("" if CC_VAR in f.env else f" ({CC_VAR} overrides)"))
        if f.gpus:
            lines.append("this node's GPUs: " + ", ".join(sorted({cap_text(cap_number(c)) for c in f.gpus})))
    else:
        lines.append("CPU build: MPI and Gloo")
    return lines + [f"note: {n}" for n in p.notes]


# ---------------------------------------------------------------- what is installed
@dataclass
class Installed:
    version: str
    folder: str
    mpi: bool
    gloo: bool
    nccl: bool
    kernels: Kernels


def probe() -> tuple[Optional[Installed], str]:
    """The Horovod this interpreter imports, or None and why not."""
    try:
        import horovod
        import horovod.torch as hvd
    except Exception as e:  # ImportError, or an undefined symbol once torch changed under it
        return None, f"{type(e).__name__}: {e}".splitlines()[0]
    folder = Path(horovod.__file__).parent
    return Installed(horovod.__version__, str(folder), bool(hvd.mpi_built()), bool(hvd.gloo_built()),
                     bool(hvd.nccl_built()), package_kernels(folder)), ""


def mismatch(p: Plan, inst: Installed) -> str:
    """Why the installed Horovod is not the planned one ('' when it is)."""
    if inst.version != VERSION:
        return f"Horovod {inst.version} is installed, not {VERSION}"
    if not inst.mpi:
        return "the installed Horovod lacks MPI"
    if inst.nccl != p.nccl:
        return f"the installed Horovod is built {'with' if inst.nccl else 'without'} NCCL"
    if set(inst.kernels.sass) != set(p.archs):
        have = inst.kernels.describe() if inst.kernels else "no CUDA kernels"
        want = ",".join(map(str, p.archs)) or "no CUDA kernels"
        return f"the installed Horovod carries {have}; the plan is {want}"
    return ""


# ---------------------------------------------------------------- doing it
@dataclass
class Action:
    kind: str                   # "none" (installed is planned), "install" (a cached wheel), "build"
    reason: str
    wheel_dir: Path
    wheel: Optional[Path]
    sdist: Path

    def describe(self, p: Plan) -> str:
        if self.kind == "none":
            return f"nothing to do: the Horovod installed is this build ({self.reason})"
        if self.kind == "install":
            return f"would install the cached {self.wheel} ({self.reason})"
        return (f"would build Horovod {VERSION} from {self.sdist} ({self.reason}), cache the wheel under "
                f"{self.wheel_dir}, then install it")


def decide(p: Plan, installed: Optional[Installed], rebuild: bool, env: Mapping[str, str] = os.environ) -> Action:
    cache = cache_dir(env)
    wheel_dir = cache / "wheels" / f"horovod-{VERSION}-{p.key}"
    wheels = sorted(wheel_dir.glob("horovod-*.whl"))
    sdist = Path(env.get("MPIDL_HOROVOD_SDIST") or cache / "src" / f"horovod-{VERSION}.tar.gz").expanduser()
    if rebuild:
        return Action("build", "--rebuild", wheel_dir, None, sdist)
    why = mismatch(p, installed) if installed else ""
    if installed and not why:
        return Action("none", f"{installed.version} in {installed.folder}", wheel_dir, None, sdist)
    why = why or "Horovod is not installed here"
    if wheels:
        return Action("install", why, wheel_dir, wheels[0], sdist)
    return Action("build", why + "; no cached wheel for this key", wheel_dir, None, sdist)


def _pip(*args: str, env: Mapping[str, str] = os.environ) -> list[str]:
    offline = ["--no-index", "--find-links", env["MPIDL_WHEELS"]] if env.get("MPIDL_WHEELS") else []
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args, *offline]


def _check(cmd: list[str], what: str) -> None:
    if subprocess.run(cmd).returncode != 0:
        raise Fault(f"{what} failed: {' '.join(cmd[2:])}")


def missing_tools(p: Plan) -> list[str]:
    """What the build needs that is not here, each as a package name a user can look up."""
    need = {"cmake": "cmake", "mpicc": "an MPI with its compiler wrappers (mpicc)"}
    out = [what for tool, what in need.items() if not shutil.which(tool)]
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        out.append("a C++ compiler (g++)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        out.append("Python's headers (python3-dev)")
    return out


def build(p: Plan, action: Action) -> Path:
    """Build the wheel into the cache; return it."""
    missing = missing_tools(p)
    if missing:
        raise Fault(f"building Horovod needs {', '.join(missing)}: on a cluster `module load cmake openmpi gcc` "
                    "(names vary by site); on Debian/Ubuntu apt-get install cmake libopenmpi-dev g++ python3-dev")
    if not action.sdist.is_file():
        if os.environ.get("MPIDL_HOROVOD_SDIST"):
            raise BadInput(f"MPIDL_HOROVOD_SDIST={action.sdist}: no such file")
        say(f"downloading the Horovod {VERSION} source package")
        action.sdist.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "download", "--no-deps",
               "--no-binary", ":all:", f"horovod=={VERSION}", "-d", str(action.sdist.parent)]
        if subprocess.run(cmd).returncode != 0 or not action.sdist.is_file():
            raise Fault(f"could not download horovod=={VERSION}; set MPIDL_HOROVOD_SDIST to a local "
                        f"horovod-{VERSION}.tar.gz")
    if not all(importlib.util.find_spec(m) for m in ("setuptools", "wheel", "cffi")):
        _check(_pip("install", *BUILD_REQUIRES), "installing Horovod's build requirements")
    with tempfile.TemporaryDirectory(prefix="mpidl-horovod-") as tmp:
        work = Path(tmp)
        with tarfile.open(action.sdist) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(work, filter="data")
            else:
                tar.extractall(work)
        tree = work / f"horovod-{VERSION}"
        for rel, old, new in PATCHES:
            path = tree / rel
            text = path.read_text() if path.is_file() else ""
            if new not in text.replace(old, new):
                raise Fault(f"{action.sdist}: the C++17 patch does not apply to {rel}: is it Horovod {VERSION}?")
            path.write_text(text.replace(old, new))
        say(f"building Horovod {VERSION} ({p.label}) — a few minutes, once per machine and key")
        log = cache_dir() / f"horovod-{VERSION}-{p.key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            wheel_cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q",
                         "--no-build-isolation", "--no-deps", "-w", str(work / "dist"), "."]
            code = subprocess.run(wheel_cmd, cwd=tree, env={**os.environ, **p.env}, stdout=out,
                                  stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = log.read_text(errors="replace").splitlines()[-40:]
            sys.stderr.write("\n".join(tail) + "\n")
            raise Fault(f"the Horovod build failed (the end of its log is above; all of it: {log})")
        log.unlink()
        built = next((work / "dist").glob("horovod-*.whl"))
        action.wheel_dir.mkdir(parents=True, exist_ok=True)
        partial = action.wheel_dir / f".{built.name}.partial"
        shutil.copyfile(built, partial)
        os.replace(partial, action.wheel_dir / built.name)  # never a half-copied wheel under its name
    record = {"horovod": VERSION, "key": p.key, "cuda": p.cuda, "nccl": p.nccl, "archs": p.archs,
              "arch_source": p.arch_source, "env": p.env, "facts": asdict(p.facts)}
    (action.wheel_dir / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    say(f"cached {built.name} under {action.wheel_dir}")
    return action.wheel_dir / built.name


def install(wheel: Path) -> None:
    _check(_pip("install", "--no-deps", "--force-reinstall", str(wheel)), "installing Horovod")
    _check(_pip("install", *RUNTIME_REQUIRES), "installing Horovod's runtime requirements")


def verify(p: Plan) -> Installed:
    """Import the installed Horovod afresh, as a job would, and check it is the planned build."""
    code = ("import json, horovod, horovod.torch as h; print(json.dumps([horovod.__version__, "
            "horovod.__file__, h.mpi_built(), h.gloo_built(), h.nccl_built()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise Fault("the installed Horovod does not import: " + (out.stderr.strip().splitlines() or ["?"])[-1])
    version, path, mpi, gloo, nccl = json.loads(out.stdout.strip().splitlines()[-1])
    folder = Path(path).parent
    inst = Installed(version, str(folder), bool(mpi), bool(gloo), bool(nccl), package_kernels(folder))
    why = mismatch(p, inst)
    if why:
        raise Fault(f"the Horovod installed is not the one planned: {why}")
    return inst


def summary(inst: Installed) -> str:
    built = ", ".join(n for n, ok in (("MPI", inst.mpi), ("Gloo", inst.gloo), ("NCCL", inst.nccl)) if ok)
    text = f"Horovod {inst.version} built with {built}"
    return text + (f"; CUDA kernels {inst.kernels.describe()}" if inst.kernels else "")


def setup(*, dry_run: bool = False, rebuild: bool = False, as_json: bool = False, check: bool = False) -> int:
    """`mpidl setup horovod`. --check: exit 0 when the Horovod installed is the planned one, else 1."""
    facts = gather()
    p = plan(facts)
    installed, why_not = probe()
    action = decide(p, installed, rebuild)
    if as_json:
        print(json.dumps({"plan": {**asdict(p), "label": p.label}, "action": action.kind, "reason": action.reason,
                          "installed": asdict(installed) if installed else None, "not_installed": why_not,
                          "wheel_dir": str(action.wheel_dir), "wheel": str(action.wheel) if action.wheel else None,
                          "sdist": str(action.sdist), "prefix": sys.prefix}, indent=2, default=sorted))
        return 0 if not check or action.kind == "none" else 1
    if check:
        say(f"Horovod up to date ({p.label})" if action.kind == "none" else f"Horovod to set up: {action.reason}")
        return 0 if action.kind == "none" else 1
    for line in describe(p):
        say(line)
    if dry_run:
        say(action.describe(p) + f", into {sys.prefix}" * (action.kind != "none"))
        say("build environment: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in p.env.items()))
        return 0
    if action.kind == "none":
        assert installed is not None
        say(f"up to date: {summary(installed)}")
        return 0
    if action.wheel is not None:
        say(f"installing the cached {action.wheel.name} ({action.reason})")
    wheel = action.wheel or build(p, action)
    install(wheel)
    say(f"installed: {summary(verify(p))}")
    return 0
