"""Installing on a real cluster: the Horovod build's CUDA architectures, `mpidl doctor` on a node
whose GPU the build misses, and a pip-installed mpidl that reaches the build and the examples.

No GPU is needed: the build is judged by its plan (what `mpidl setup horovod` would pass to
Horovod's build, for the facts of a machine given here), the reader of compiled kernels by a
library nvcc builds where nvcc is installed, and doctor by its logic with a given capability.
The pip install is real: a source package and wheel of this checkout, installed into a fresh venv.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from mpidl.errors import BadInput, Fault
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
    from mpidl import cli

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
