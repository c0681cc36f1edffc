"""Installing on a real cluster: the Horovod build's CUDA architectures, `mpidl doctor` on a node
whose GPU the build misses, and a pip-installed mpidl that reaches the build and the examples.

No GPU is needed: the build is judged by its plan (what `mpidl setup horovod` would pass to
Horovod's build, for the facts of a machine given here), the reader of compiled kernels by a
library nvcc builds where nvcc is installed, and doctor by its logic with a given capability.
The pip install is real: a source package and wheel of this checkout, installed into a fresh venv.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

import pytest

from conftest import ROOT
from mpidl.errors import BadInput, Fault
from mpidl.install import examples
from mpidl.install import horovod as hv
from mpidl.install.cuda import Kernels, arch_numbers, library_kernels, parse_cc_list

TORCH_CU126 = [50, 60, 70, 75, 80, 86, 90]          # torch 2.6+cu126's get_arch_list(), as numbers
NVCC_126 = [50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90]
NVCC_130 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121]
V100, A100, H100, B200 = (7, 0), (8, 0), (9, 0), (10, 0)


def login_node(**changes) -> hv.Facts:
    """A login node: CUDA torch, nvcc and NCCL on PATH, no GPU."""
    facts = hv.Facts(python="311", torch="2.6.0+cu126", torch_cuda="12.6", torch_archs=list(TORCH_CU126), gpus=[],
                     nvcc="/opt/cuda-12.6/bin/nvcc", nvcc_on_path=True, nvcc_release="12.6",
                     nvcc_archs=list(NVCC_126), nccl_header="/opt/nccl/include/nccl.h", cpus=8, env={})
    for k, v in changes.items():
        setattr(facts, k, v)
    return facts


# ---------------------------------------------------------------- the plan: architectures, flags, key
def test_gpu_build_takes_the_architectures_torch_targets():
    p = hv.plan(login_node())
    assert p.cuda and p.nccl
    assert p.env["HOROVOD_BUILD_CUDA_CC_LIST"] == "50,60,70,75,80,86,90"
    assert p.env["HOROVOD_GPU_OPERATIONS"] == "NCCL" and p.env["HOROVOD_WITHOUT_GLOO"] == "1"
    assert p.env["HOROVOD_WITH_MPI"] == "1" and p.env["MAKEFLAGS"] == "-j8"
    assert "torch 2.6.0+cu126" in p.arch_source
    assert p.key == "py311-torch2.6.0_cu126-cuda12.6-nccl-sm50_60_70_75_80_86_90"
    # Before, 90 alone: a V100 or A100 cluster had no kernel image. Now every GPU torch runs on does.
    assert all(p.kernels.runs_on(cap) for cap in (V100, A100, H100, B200))
    said = "\n".join(hv.describe(p))
    assert "CUDA architectures 50,60,70,75,80,86,90: from torch 2.6.0+cu126's architectures" in said


def test_user_list_wins_and_is_part_of_the_cache_key():
    mine = hv.plan(login_node(env={"HOROVOD_BUILD_CUDA_CC_LIST": "80,90"}))
    assert mine.archs == [80, 90] and mine.env["HOROVOD_BUILD_CUDA_CC_LIST"] == "80,90"
    assert "HOROVOD_BUILD_CUDA_CC_LIST, as set" in mine.arch_source
    # A wheel cached for other architectures is never the one installed.
    assert mine.key != hv.plan(login_node()).key
    assert mine.key != hv.plan(login_node(env={"HOROVOD_BUILD_CUDA_CC_LIST": "90"})).key


def test_the_gpu_here_missing_from_the_list_is_said():
    p = hv.plan(login_node(gpus=[V100], env={"HOROVOD_BUILD_CUDA_CC_LIST": "80,90"}))
    assert any("compute capability 7.0" in n and "not among them" in n for n in p.notes)
    assert not any("not among them" in n for n in hv.plan(login_node(gpus=[A100])).notes)


def test_architectures_nvcc_cannot_compile_are_left_out_and_named():
    p = hv.plan(login_node(nvcc_release="13.0", nvcc_archs=list(NVCC_130)))
    assert p.archs == [75, 80, 86, 90]
    assert any("nvcc 13.0 cannot compile for 50,60,70" in n for n in p.notes)
    assert any("differ in major version" in n for n in p.notes)  # nvcc 13 against torch's CUDA 12.6


def test_a_bad_user_list_is_one_line_naming_the_variable():
    cuda13 = login_node(nvcc_release="13.0", nvcc_archs=list(NVCC_130), env={"HOROVOD_BUILD_CUDA_CC_LIST": "70,80"})
    with pytest.raises(BadInput, match=r"^HOROVOD_BUILD_CUDA_CC_LIST=70,80: nvcc 13.0 cannot compile for 70; it can "):
        hv.plan(cuda13)
    with pytest.raises(BadInput, match=r"^HOROVOD_BUILD_CUDA_CC_LIST='8.0,9.0': give compute capabilities without "):
        parse_cc_list("8.0,9.0", "HOROVOD_BUILD_CUDA_CC_LIST")


def test_without_torch_architectures_the_gpus_present_decide():
    p = hv.plan(login_node(torch_archs=[], gpus=[A100, A100, H100]))
    assert p.archs == [80, 90] and "GPUs on this node" in p.arch_source
    with pytest.raises(Fault, match="set HOROVOD_BUILD_CUDA_CC_LIST"):
        hv.plan(login_node(torch_archs=[], gpus=[]))


def test_cpu_torch_with_a_cuda_toolkit_builds_for_cpus_and_says_how_to_get_the_nccl_build():
    p = hv.plan(login_node(torch="2.13.0+cpu", torch_cuda=None, torch_archs=[]))
    assert not p.cuda and not p.nccl and p.key == "py311-torch2.13.0_cpu-cpu"
    assert "HOROVOD_BUILD_CUDA_CC_LIST" not in p.env and p.env["HOROVOD_WITH_GLOO"] == "1"
    note = " ".join(p.notes)
    assert "nvcc and NCCL found, but torch 2.13.0+cpu is a CPU build" in note
    assert "'A CUDA build of torch' in docs/install.md" in note
    assert "## A CUDA build of torch" in (ROOT / "docs" / "install.md").read_text()  # the section named exists


def test_nccl_home_and_a_toolkit_off_path_reach_horovods_build():
    p = hv.plan(login_node(nvcc="/opt/cuda-12.6/bin/nvcc", nvcc_on_path=False, env={"NCCL_HOME": "/opt/nccl"}))
    assert p.env["HOROVOD_NCCL_HOME"] == "/opt/nccl"  # Horovod's FindNCCL reads only its own variable
    assert p.env["HOROVOD_CUDA_HOME"] == "/opt/cuda-12.6" and p.env["CUDA_HOME"] == "/opt/cuda-12.6"
    p = hv.plan(login_node(nccl_header=None))
    assert p.cuda and not p.nccl and p.key.endswith("-mpi-sm50_60_70_75_80_86_90")
    assert any("NCCL's headers are not found" in n for n in p.notes)


def test_arch_names_as_torch_and_nvcc_write_them():
    assert arch_numbers("sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90 sm_90a compute_90") == [50, 60, 70, 75, 80, 86, 90]
    assert Kernels(frozenset({80}), frozenset()).runs_on((8, 6))       # same major, higher minor
    assert not Kernels(frozenset({86}), frozenset()).runs_on((8, 0))
    assert not Kernels(frozenset({90}), frozenset()).runs_on((10, 0))
    assert Kernels(frozenset({90}), frozenset({90})).runs_on((10, 0))  # PTX: compiled by the driver


def test_gather_reads_this_machine():
    import torch

    facts = hv.gather()
    assert facts.torch == torch.__version__ and facts.torch_cuda == torch.version.cuda
    if facts.nvcc:
        assert facts.nvcc_release and facts.nvcc_archs, facts  # nvcc --list-gpu-code, parsed
    p = hv.plan(facts)
    assert p.key.startswith(f"py{sys.version_info[0]}{sys.version_info[1]}-torch")


def test_fault_without_ranks_is_one_line(monkeypatch, capsys):
    """`mpidl setup horovod` runs no ranks; a Fault there (mocked: torch missing cannot be arranged
    in this venv) is one line and exit 1."""
    import mpidl.world
    from mpidl import cli

    # Earlier tests in this process may have made a World; a rankless command must not meet it.
    monkeypatch.setattr(mpidl.world, "_world", None)

    def no_torch(env=os.environ):
        raise Fault("torch is not importable here")

    monkeypatch.setattr(hv, "gather", no_torch)
    assert cli.main(["setup", "horovod", "--dry-run"]) == 1
    assert capsys.readouterr().err == "error: torch is not importable here\n"


# ---------------------------------------------------------------- what a compiled library carries
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc to compile a CUDA library (no GPU needed)")
def test_kernels_read_from_a_library_nvcc_built(tmp_path):
    """Horovod's build passes these flags for HOROVOD_BUILD_CUDA_CC_LIST=80,90 (cmake/build_utils.py)."""
    src = tmp_path / "k.cu"
    src.write_text("__global__ void scale(float* x, float a) { x[threadIdx.x] *= a; }\n"
                   'extern "C" void launch(float* x, float a) { scale<<<1, 32>>>(x, a); }\n')
    lib = tmp_path / "libk.so"
    subprocess.run([NVCC, "-O3", "-Xcompiler", "-fPIC", "-shared", "-gencode", "arch=compute_80,code=sm_80",
                    "-gencode", 'arch=compute_90,code="sm_90,compute_90"', str(src), "-o", str(lib)],
                   check=True, capture_output=True, timeout=300)
    kernels = library_kernels(lib)
    assert kernels == Kernels(frozenset({80, 90}), frozenset({90})), kernels
    assert kernels.describe() == "sm_80, sm_90 (+PTX 9.0)"
    assert not library_kernels(Path(sys.executable).resolve())  # an ELF without CUDA kernels


# ---------------------------------------------------------------- doctor on a GPU node
def test_doctor_names_the_gpu_a_horovod_build_misses():
    from mpidl import doctor

    only_90 = Kernels(frozenset({90}), frozenset({90}))
    line = doctor.gpu_mismatch(only_90, [("NVIDIA A100-SXM4-80GB", A100), ("NVIDIA A100-SXM4-80GB", A100)])
    assert line == "CUDA kernels sm_90 (+PTX 9.0) do not run on this node's NVIDIA A100-SXM4-80GB (8.0)"
    assert doctor.gpu_mismatch(only_90, [("NVIDIA H100", H100), ("NVIDIA B200", B200)]) == ""
    assert doctor.gpu_mismatch(Kernels(), [("NVIDIA A100", A100)]) == ""  # a CPU build: said in its detail


def test_doctor_fails_horovod_on_a_node_its_kernels_miss(monkeypatch):
    """The real check with the real Horovod; the GPU and the build's kernels are given, since this
    machine has neither (mocked: no GPU here)."""
    pytest.importorskip("horovod.torch")
    from mpidl import doctor

    monkeypatch.setattr(doctor, "_gpus", lambda: [("NVIDIA V100-SXM2-32GB", V100)])
    monkeypatch.setattr(doctor, "package_kernels", lambda folder: Kernels(frozenset({80, 90}), frozenset({90})))
    check = doctor._horovod()
    assert not check.ok and check.core
    assert check.detail.endswith(": CUDA kernels sm_80, sm_90 (+PTX 9.0) do not run on this node's "
                                 "NVIDIA V100-SXM2-32GB (7.0)"), check.detail
    assert "mpidl setup horovod" in check.fix
    shown = doctor.render([check]).splitlines()
    assert len(shown) == 2 and shown[0].startswith("FAIL horovod") and shown[1].startswith("problem: horovod:")
    monkeypatch.setattr(doctor, "_gpus", lambda: [("NVIDIA A100", A100)])
    assert doctor._horovod().ok


# ---------------------------------------------------------------- the examples
def test_examples_copy_refuses_before_writing_anything(tmp_path):
    assert examples.source() == ROOT  # in a checkout, the checkout's own files
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "demo.yaml").write_text("mine\n")
    with pytest.raises(BadInput, match=r"jobs/demo.yaml: already exists \(1 of the \d+ example files"):
        examples.copy(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["demo.yaml"]
    assert (tmp_path / "jobs" / "demo.yaml").read_text() == "mine\n"


# ---------------------------------------------------------------- a pip-installed mpidl
def _checkout_copy(dest: Path) -> Path:
    """The files this checkout would ship: tracked and untracked-but-not-ignored."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file() and not (ROOT / rel).is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def _build(cwd: Path, hook: str, out: Path) -> Path:
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return out / p.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def pip_wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout as pip builds one: from a source package of its shipped files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know which files it ships")
    tmp = tmp_path_factory.mktemp("dist")
    sdist = _build(_checkout_copy(tmp / "checkout"), "build_sdist", tmp)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return _build(tmp / "unpacked" / sdist.name[:-len(".tar.gz")], "build_wheel", tmp)


def fresh_venv(wheel: Path, tmp: Path) -> Path:
    """mpidl as `pip install mpidl` leaves it: the wheel installed with --no-deps into a fresh venv.
    Its requirements come from this venv's site-packages, seen through a folder of links to
    everything there but Horovod and mpidl (no 85 s of downloads; Horovod missing, as after pip)."""
    site = Path(sysconfig.get_paths()["purelib"])
    shared = tmp / "shared-site-packages"
    shared.mkdir(parents=True)
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("horovod", "mpidl", "__editable__", "_mpidl")) and entry.suffix != ".pth":
            (shared / entry.name).symlink_to(entry)
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_shared.pth").write_text(f"{shared}\n")
    p = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python),
                        "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    if "no such option: --python" in p.stderr:
        pytest.skip("pip here is older than 22.3 (no --python)")
    assert p.returncode == 0, p.stderr
    return env_dir


@pytest.fixture(scope="module")
def pip_venv(pip_wheel, tmp_path_factory) -> tuple[Path, Path]:
    """One fresh venv for the tests that change nothing in it."""
    tmp = tmp_path_factory.mktemp("pip")
    return fresh_venv(pip_wheel, tmp), tmp


def _in(env_dir: Path, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MPIDL_CACHE", "MPIDL_HOROVOD_SDIST")}
    return subprocess.run([str(env_dir / "bin" / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd,
                          env={**clean, **env}, timeout=300)


def test_pip_installed_mpidl_points_at_its_own_horovod_build(pip_venv):
    env_dir, tmp = pip_venv
    p = _in(env_dir, ["python", "-c", "import mpidl; print(mpidl.__file__)"], tmp)
    assert p.stdout.startswith(str(env_dir)), p.stdout + p.stderr  # the wheel's mpidl, not the checkout's
    p = _in(env_dir, ["mpidl", "doctor", "--json"], tmp)
    assert p.returncode == 1, p.stdout + p.stderr
    check = json.loads(p.stdout)["checks"]["horovod"]
    assert not check["ok"] and "ModuleNotFoundError" in check["detail"]
    assert "mpidl setup horovod" in check["fix"] and "checkout" not in check["fix"]


def test_pip_installed_setup_horovod_dry_run_says_what_it_would_do(pip_venv):
    env_dir, tmp = pip_venv
    cache = tmp / "empty-cache"
    p = _in(env_dir, ["mpidl", "setup", "horovod", "--dry-run"], tmp, MPIDL_CACHE=str(cache))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert f"[setup] Horovod {hv.VERSION} for Python" in out
    assert f"would build Horovod {hv.VERSION} from {cache}/src/horovod-{hv.VERSION}.tar.gz" in out
    assert f"into {env_dir}" in out
    assert "build environment: HOROVOD_WITH_PYTORCH=1" in out and "CMAKE_POLICY_VERSION_MINIMUM=3.5" in out
    assert "Horovod is not installed here" in out
    assert not cache.exists()  # a dry run changes nothing
    assert _in(env_dir, ["python", "-c", "import horovod"], tmp).returncode != 0


def test_pip_installed_examples_copy_is_the_checkouts(pip_venv):
    env_dir, tmp = pip_venv
    dest = tmp / "work"
    p = _in(env_dir, ["mpidl", "examples", "--copy", str(dest)], tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    copied = sorted(q.relative_to(dest) for q in dest.rglob("*") if q.is_file())
    # MANIFEST.in (into the sdist) and examples.FILES (into the wheel) agree.
    assert copied == sorted(examples.files(ROOT)) and len(copied) >= 10
    assert all((dest / rel).read_bytes() == (ROOT / rel).read_bytes() for rel in copied)
    import yaml

    studies = sorted((dest / "benchmarks" / "studies").glob("*.yaml"))
    assert len(studies) >= 3
    for study in studies:  # each study's files come along (its allreduce figures, where it names them)
        tree = yaml.safe_load(study.read_text())
        named = [tree["job"]] + ([tree["allreduce"]] if "allreduce" in tree else [])
        assert all((dest / rel).is_file() for rel in named), study
    p = _in(env_dir, ["mpidl", "examples", "--copy", str(dest)], tmp)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "already exists" in p.stderr


@pytest.mark.slow
def test_pip_installed_setup_horovod_installs_the_cached_wheel(pip_wheel, tmp_path):
    """The install itself, when this machine's wheel cache makes it cheap (no second build); in a
    venv of its own, since it changes it."""
    tmp = tmp_path
    env_dir = fresh_venv(pip_wheel, tmp)
    p = _in(env_dir, ["mpidl", "setup", "horovod", "--json"], tmp)
    assert p.returncode == 0, p.stderr
    if json.loads(p.stdout)["action"] != "install":
        pytest.skip("no cached Horovod wheel for this environment: installing would mean a build of minutes")
    p = _in(env_dir, ["mpidl", "setup", "horovod"], tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "installing the cached horovod-" in p.stdout
    assert "[setup] installed: Horovod 0.28.1 built with MPI" in p.stdout
    p = _in(env_dir, ["python", "-c", "import horovod; print(horovod.__file__)"], tmp)
    assert p.stdout.startswith(str(env_dir)), p.stdout + p.stderr
    assert _in(env_dir, ["mpidl", "setup", "horovod", "--check"], tmp).returncode == 0
    p = _in(env_dir, ["mpidl", "doctor", "--json"], tmp)
    assert json.loads(p.stdout)["checks"]["horovod"]["ok"], p.stdout


STAND_IN_SETUP = '''
import os
from setuptools import setup
# What the real build would be given: the variables, and the CMakeLists after the patches.
seen = {k: v for k, v in os.environ.items() if k.startswith(("HOROVOD_", "CMAKE_", "CXXFLAGS", "MAKEFLAGS"))}
seen["cmakelists"] = [open(p).read() for p in ("CMakeLists.txt", "horovod/torch/CMakeLists.txt")]
with open("horovod/seen.py", "w") as f:
    f.write("SEEN = %r\\n" % seen)
setup(name="horovod", version="0.28.1", packages=["horovod", "horovod.torch"])
'''
STAND_IN_TORCH = "def mpi_built(): return True\ndef gloo_built(): return True\ndef nccl_built(): return False\n"


def stand_in_sdist(tmp: Path, cmake_line: str = "set(CMAKE_CXX_STANDARD 14)") -> Path:
    """A source package named as Horovod's that builds in a second: a pure wheel recording what its
    build was given (mocked: the real compile takes minutes and its wheel is cached here)."""
    tree = tmp / "stand-in" / f"horovod-{hv.VERSION}"
    (tree / "horovod" / "torch").mkdir(parents=True)
    (tree / "setup.py").write_text(STAND_IN_SETUP)
    (tree / "CMakeLists.txt").write_text(cmake_line + "\n")
    (tree / "horovod" / "torch" / "CMakeLists.txt").write_text(cmake_line + "\n")
    (tree / "horovod" / "__init__.py").write_text(f"__version__ = {hv.VERSION!r}\n")
    (tree / "horovod" / "torch" / "__init__.py").write_text(STAND_IN_TORCH)
    sdist = tmp / f"horovod-{hv.VERSION}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    return sdist


@pytest.mark.slow
def test_pip_installed_setup_horovod_builds_caches_and_installs(pip_wheel, tmp_path):
    """The build path end to end, on a stand-in source package: the patches and the variables reach
    the build, the wheel is cached under the plan's key with its record, installed and checked."""
    import zipfile

    if hv.missing_tools(hv.plan(hv.gather())):
        pytest.skip(f"the build's tools are missing here: {hv.missing_tools(hv.plan(hv.gather()))}")
    env_dir = fresh_venv(pip_wheel, tmp_path)
    cache = tmp_path / "cache"
    env = {"MPIDL_CACHE": str(cache), "MPIDL_HOROVOD_SDIST": str(stand_in_sdist(tmp_path))}
    p = _in(env_dir, ["mpidl", "setup", "horovod"], tmp_path, **env)
    assert p.returncode == 0, p.stdout + p.stderr
    plan = json.loads(_in(env_dir, ["mpidl", "setup", "horovod", "--json"], tmp_path, **env).stdout)["plan"]
    wheel_dir = cache / "wheels" / f"horovod-{hv.VERSION}-{plan['key']}"
    assert f"[setup] building Horovod {hv.VERSION} ({plan['label']})" in p.stdout
    assert f"cached horovod-{hv.VERSION}-py3-none-any.whl under {wheel_dir}" in p.stdout
    assert "[setup] installed: Horovod 0.28.1 built with MPI, Gloo" in p.stdout
    record = json.loads((wheel_dir / "build.json").read_text())
    assert record["key"] == plan["key"] and record["env"] == plan["env"]
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as whl:
        seen: dict = {}
        exec(whl.read("horovod/seen.py").decode(), seen)
    seen = seen["SEEN"]
    for k, v in plan["env"].items():
        assert seen.get(k, "") == v, k
    assert all("CMAKE_CXX_STANDARD 17" in text for text in seen.pop("cmakelists"))
    assert not list(cache.glob("*.log"))  # a build that worked leaves no log behind
    # Installed is planned: the second run does nothing, and --check agrees.
    p = _in(env_dir, ["mpidl", "setup", "horovod"], tmp_path, **env)
    assert "[setup] up to date: Horovod 0.28.1 built with MPI, Gloo" in p.stdout, p.stdout + p.stderr
    assert _in(env_dir, ["mpidl", "setup", "horovod", "--check"], tmp_path, **env).returncode == 0


def test_a_source_package_the_patch_does_not_fit_is_refused(pip_wheel, tmp_path):
    if hv.missing_tools(hv.plan(hv.gather())):
        pytest.skip("the build's tools are missing here")
    env_dir = fresh_venv(pip_wheel, tmp_path)
    sdist = stand_in_sdist(tmp_path, cmake_line="set(CMAKE_CXX_STANDARD 11)")
    p = _in(env_dir, ["mpidl", "setup", "horovod"], tmp_path, MPIDL_CACHE=str(tmp_path / "cache"),
            MPIDL_HOROVOD_SDIST=str(sdist))
    assert p.returncode == 1
    # pip's own warnings (an index location it skips, say) may come before: the error is one line
    said = [line for line in p.stderr.splitlines() if not line.startswith("WARNING: ")]
    assert said == [f"error: {sdist}: the C++17 patch does not apply to CMakeLists.txt: is it Horovod 0.28.1?"]
    assert not (tmp_path / "cache" / "wheels").exists()
