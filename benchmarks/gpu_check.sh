#!/usr/bin/env bash
# The whole GPU verification in one command, for a CUDA machine without network.
#
#   bash benchmarks/gpu_check.sh prepare      # here, with network: fills offline/ (make gpu-check-prepare)
#   bash benchmarks/gpu_check.sh run [OUT]    # there: install, build, test, measure (make gpu-check)
#
# prepare: the Horovod source package (from the mpidl cache, else downloaded) and the wheels a
#   machine that already has torch, mpi4py, h5py and numpy lacks (mpidl's other requirements,
#   the test tools, Horovod's runtime and build requirements), binary ones for the GPU machine's
#   CPython (GPU_CHECK_PYTHONS, default 3.12), into offline/ (ignored by git; carry it with the
#   checkout: it must fit the device call's 64 MiB with the tree, so what that machine has is left out).
# run: without CUDA it says so, records the skip and exits 0. With CUDA: a venv that reuses the
#   machine's CUDA torch (--system-site-packages), everything installed from offline/ with
#   pip --no-index, Horovod built with NCCL, then the GPU tests (pytest -m gpu), ResNet-50 of
#   bench_train.py and the GPU part of bench_data.py. Every log and result goes under OUT (the
#   argument, else $OUT), with gpu-check.json summarising each stage (status, seconds) and the
#   device. A failed stage does not stop the later ones; the exit status is 1 if any failed.
#
# Knobs: PYTHON (the interpreter with CUDA torch, default python3), GPU_CHECK_TRAIN_ARGS (extra
# bench_train.py arguments; default "--repeats 1 --steps 100 --windows 20" keeps the run within
# 8 minutes on a 16-core H100 machine), HOROVOD_BUILD_CUDA_CC_LIST (default: the architectures
# torch is built for; see `mpidl setup horovod --dry-run`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OFFLINE="$ROOT/offline"
HOROVOD_VERSION=0.28.1
PY="${PYTHON:-python3}"

say() { printf '[gpu-check] %s\n' "$*"; }
die() { printf '[gpu-check] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prepare (with network)
requirements() {
    # mpidl's requirements and its test extra, less what the GPU machine's python already has.
    "$1" - "$ROOT/setup.cfg" <<'EOF'
import configparser, re, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
reqs = cfg["options"]["install_requires"].split() + cfg["options.extras_require"]["test"].split()
have = {"torch", "numpy", "mpi4py", "h5py"}
print("\n".join(r for r in reqs if re.split(r"[<>=!~ ]", r)[0].lower() not in have))
EOF
}

prepare() {
    local vpy="$ROOT/.venv/bin/python"
    [ -x "$vpy" ] || die "run 'make setup' first (prepare uses the venv's pip)"
    local cache="${MPIDL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mpidl}"
    local sdist="${MPIDL_HOROVOD_SDIST:-$cache/src/horovod-$HOROVOD_VERSION.tar.gz}"
    mkdir -p "$OFFLINE/wheels"
    if [ -f "$sdist" ]; then
        cp "$sdist" "$OFFLINE/"
    else
        say "downloading the Horovod $HOROVOD_VERSION source package"
        "$vpy" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$OFFLINE"
    fi
    local -a reqs
    mapfile -t reqs < <(requirements "$vpy")
    # Horovod's runtime requirements, and what building it and mpidl needs in a bare venv.
    reqs+=(cffi cloudpickle psutil pyyaml packaging "setuptools>=61" wheel)
    local v
    for v in ${GPU_CHECK_PYTHONS:-3.12}; do
        say "wheels for CPython $v: ${reqs[*]}"
        "$vpy" -m pip download -q --only-binary :all: --python-version "$v" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$OFFLINE/wheels" "${reqs[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    done
    ls "$OFFLINE"/wheels/*.whl >/dev/null 2>&1 || die "no wheels were downloaded"
    # Dependencies of the above that the GPU machine's python has (numpy, by way of matplotlib):
    # the venv sees that python's packages, and these would only weigh down the carried folder.
    rm -f "$OFFLINE"/wheels/{torch,numpy,mpi4py,h5py}-*.whl
    (cd "$OFFLINE" && sha256sum horovod-*.tar.gz wheels/*.whl > MANIFEST)
    # The commit the carried checkout is at: where it runs, a copied tree's git may lag behind it.
    git -C "$ROOT" describe --always --dirty > "$OFFLINE/COMMIT" 2>/dev/null || echo unknown > "$OFFLINE/COMMIT"
    say "ready: $(du -sh "$OFFLINE" | cut -f1) in $(basename "$OFFLINE")/ ($(ls "$OFFLINE"/wheels | wc -l) wheels)"
}

# ---------------------------------------------------------------- run (on the CUDA machine)
STAGES=()
FAILED=0

stage() {  # stage NAME CMD...: run, log to OUT/NAME.log, record status and seconds
    local name="$1"
    shift
    local t0 rc
    t0=$(date +%s.%N)
    say "$name ..."
    if "$@" > "$OUT/$name.log" 2>&1; then rc=0; else rc=$?; FAILED=1; fi
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    say "$name: $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc, see $name.log)") in ${secs}s"
    [ $rc = 0 ] || tail -15 "$OUT/$name.log" | sed 's/^/    /'
    STAGES+=("{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $secs}")
}

summary() {  # summary SKIPPED_REASON
    local device
    device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' \
             2>/dev/null || true)
    local stages
    stages=$(IFS=,; echo "${STAGES[*]:-}")
    local prepared=null
    [ -f "$OFFLINE/COMMIT" ] && prepared="\"$(head -c 64 "$OFFLINE/COMMIT" | tr -dc 'A-Za-z0-9._-')\""
    printf '{"device": "%s", "skipped": %s, "failed": %s, "commit": "%s", "prepared_at": %s, "stages": [%s]}\n' \
        "$device" "${1:-null}" "$([ $FAILED = 1 ] && echo true || echo false)" \
        "$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)" "$prepared" "$stages" \
        > "$OUT/gpu-check.json"
}

install_offline() {
    [ -d "$OFFLINE/wheels" ] || { echo "no $OFFLINE/wheels: run 'make gpu-check-prepare' where there is network"; return 1; }
    MPIDL_WHEELS="$OFFLINE/wheels" MPIDL_EXTRAS=test MPIDL_SKIP_SLURM=1 PYTHON="$PY" \
        MPIDL_HOROVOD_SDIST="$(ls "$OFFLINE"/horovod-*.tar.gz | head -1)" bash "$ROOT/scripts/setup.sh"
    "$ROOT/.venv/bin/python" -c '
import horovod, horovod.torch as hvd, torch
print("horovod", horovod.__version__, "nccl_built", hvd.nccl_built(), "torch", torch.__version__, torch.cuda.get_device_name(0))
assert hvd.nccl_built(), "Horovod was built without NCCL"'
}

machine_facts() {  # what the results were measured on, and the tools the build relies on
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -c 'import sys; print(sys.executable, "in", sys.prefix)'
    (cd "$ROOT" && "$PY" -m mpidl.scaling.environment)  # the versions a study records (stdlib imports only)
    command -v nvcc cmake mpicc mpirun g++
    nvcc --version | tail -2; mpirun --version | head -1; cmake --version | head -1
    ls /usr/include/nccl.h
    echo "cores $(nproc), memory $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
}

run() {
    OUT="${1:-${OUT:-}}"
    [ -n "$OUT" ] || die "give the output folder: gpu_check.sh run OUT (or set \$OUT)"
    mkdir -p "$OUT"
    OUT="$(cd "$OUT" && pwd)"
    exec > >(tee -a "$OUT/gpu-check.log") 2>&1
    say "results and logs go to $OUT"
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        say "no CUDA device for $PY (torch missing, CPU-only, or no GPU): nothing to check"
        summary '"no CUDA device"'
        return 0
    fi
    [ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
        OMPI_MCA_btl_vader_single_copy_mechanism=none MAKEFLAGS="-j$(nproc)"
    local vpy="$ROOT/.venv/bin/python"
    stage machine machine_facts
    stage install install_offline
    stage gpu-tests "$vpy" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml" "$ROOT/tests"
    # shellcheck disable=SC2086
    stage bench-train "$vpy" "$ROOT/benchmarks/bench_train.py" --workload resnet50 ${GPU_CHECK_TRAIN_ARGS:---repeats 1 --steps 100 --windows 20}
    cp "$ROOT"/benchmarks/results/train-resnet50-*.json "$OUT/" 2>/dev/null || true
    stage bench-data "$vpy" "$ROOT/benchmarks/bench_data.py" --gpu-only --out "$OUT"
    summary null
    say "done: $([ $FAILED = 0 ] && echo "every stage ok" || echo "some stages FAILED"); summary in $OUT/gpu-check.json"
    return $FAILED
}

case "${1:-}" in
    prepare) prepare ;;
    requirements) requirements "${PYTHON:-python3}" ;;  # what prepare fetches for mpidl (for tests)
    run) shift; run "$@" ;;
    *) die "usage: gpu_check.sh prepare | run [OUT] | requirements" ;;
esac
