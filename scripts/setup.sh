#!/usr/bin/env bash
# One idempotent set-up path for mpidl: system packages (as root on Debian/Ubuntu),
# the .venv at the repo root, the Python stack, and Horovod 0.28.1 built from its
# source package (by `mpidl setup horovod`, the same command a pip-installed mpidl runs).
# A second run with everything in place takes seconds.
#
# Environment knobs:
#   MPIDL_CACHE            where built wheels and the Horovod source live
#                          (default ${XDG_CACHE_HOME:-$HOME/.cache}/mpidl)
#   MPIDL_HOROVOD_SDIST    a horovod-0.28.1.tar.gz to use instead of downloading one
#   MPIDL_SKIP_HOROVOD=1   set up everything but Horovod
#   MPIDL_SKIP_CHROMIUM=1  no headless Chromium (only the report-rendering test needs it)
#   PYTHON                 the interpreter the venv is made from (default python3)
#   MPIDL_WHEELS           install offline: every Python package from this folder of wheels
#                          (pip --no-index; `make gpu-check-prepare` fills one)
#   MPIDL_EXTRAS           mpidl's extras to install (default dev)
#   MPIDL_SKIP_SLURM=1     do not install SLURM for the local test cluster
#   HOROVOD_BUILD_CUDA_CC_LIST  the CUDA architectures of a GPU build, e.g. 80,90 (default: those
#                          the venv's torch is built for)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
CACHE="${MPIDL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mpidl}"
TORCH_VERSION=2.13.0

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- system packages
missing=()
command -v mpirun >/dev/null || missing+=(openmpi-bin)
command -v mpicc >/dev/null || missing+=(libopenmpi-dev)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v cmake >/dev/null || missing+=(cmake)
command -v "$PY" >/dev/null || missing+=(python3)
if command -v "$PY" >/dev/null; then
    "$PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    [ -f "$inc/Python.h" ] || missing+=(python3-dev)
fi

# SLURM and munge: only for the tests' local cluster (slurm/cluster.sh); installed when we
# can, never required (a login node has its own SLURM; elsewhere those tests skip).
can_apt=0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then can_apt=1; fi
if [ "$can_apt" = 1 ] && [ "${MPIDL_SKIP_SLURM:-0}" != 1 ]; then
    command -v slurmctld >/dev/null || missing+=(slurmctld slurmd slurm-client munge)
fi

# Headless Chromium: only for the test that opens `mpidl report`'s HTML page (it skips only where
# this cannot install it). Debian's package is a real browser; Ubuntu's is a snap stub containers cannot run.
if [ "$can_apt" = 1 ] && [ "${MPIDL_SKIP_CHROMIUM:-0}" != 1 ] && grep -qs '^ID=debian' /etc/os-release; then
    command -v chromium >/dev/null || missing+=(chromium)
fi

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$can_apt" = 1 ]; then
        say "installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        {
            echo "[setup] missing system packages: ${missing[*]}"
            echo "[setup] on Debian/Ubuntu as root:  apt-get install ${missing[*]}"
            echo "[setup] on a cluster:               module load openmpi cmake gcc python  (names vary by site)"
        } >&2
        exit 1
    fi
fi

# ---------------------------------------------------------------- the venv
STAMP="$VENV/.mpidl-setup"
want_stamp="$(cat "$ROOT/setup.cfg" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"

# A system torch with CUDA (as on GPU machines) is used as is; elsewhere the CPU build.
sys_cuda_torch=0
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    sys_cuda_torch=1
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $(basename "$VENV")"
    if [ "$sys_cuda_torch" = 1 ]; then
        "$PY" -m venv --system-site-packages "$VENV"
        # Where that torch lives in a venv itself (GPU images often do), --system-site-packages
        # reaches only the base interpreter's packages: a .pth file adds the parent venv's.
        "$PY" -c 'import site, sys; sys.prefix != sys.base_prefix and print("\n".join(site.getsitepackages()))' \
            > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_mpidl_parent_venv.pth"
    else
        "$PY" -m venv "$VENV"
    fi
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)
OFFLINE_ARGS=()
if [ -n "${MPIDL_WHEELS:-}" ]; then
    OFFLINE_ARGS=(--no-index --find-links "$MPIDL_WHEELS")
fi
pip_install() { "${PIP[@]}" install "${OFFLINE_ARGS[@]}" "$@"; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
    && "$VPY" -c 'import mpidl, torch, mpi4py.MPI, h5py, submitit' 2>/dev/null \
    && { [ "${MPIDL_SKIP_HOROVOD:-0}" = 1 ] || MPIDL_CACHE="$CACHE" "$VENV/bin/mpidl" setup horovod --check >/dev/null 2>&1; }; then
    say "environment up to date ($(basename "$VENV"))"
    exit 0
fi

if ! "$VPY" -c 'import torch' 2>/dev/null; then
    say "installing torch==$TORCH_VERSION (CPU)"
    pip_install "torch==$TORCH_VERSION"
fi

# mpi4py is built against the MPI found on PATH so that it and mpirun agree;
# pip caches the built wheel, so this compiles once per machine.
if ! "$VPY" -c 'import mpi4py.MPI' 2>/dev/null; then
    say "building mpi4py against $(mpirun --version 2>/dev/null | head -1)"
    pip_install --no-binary mpi4py mpi4py
fi

say "installing mpidl and its Python dependencies"
pip_install -e "$ROOT[${MPIDL_EXTRAS:-dev}]"

# ---------------------------------------------------------------- Horovod
# mpidl's own command builds it (patches, flags, the CUDA architectures, the wheel cache), so that a
# pip-installed mpidl builds it the same way: it reads MPIDL_CACHE, MPIDL_HOROVOD_SDIST, MPIDL_WHEELS.
if [ "${MPIDL_SKIP_HOROVOD:-0}" != 1 ]; then
    MPIDL_CACHE="$CACHE" "$VENV/bin/mpidl" setup horovod || die "Horovod was not set up (above)"
fi

"$VPY" -c 'import mpidl, torch, mpi4py.MPI, h5py, submitit' \
    || die "the environment does not import (see above)"
echo "$want_stamp" > "$STAMP"
say "ready: $(basename "$VENV") with torch $("$VPY" -c 'import torch; print(torch.__version__)')"
