#!/usr/bin/env bash
# Set up hvd_megdet on a fresh Debian machine (or a cluster login node), idempotently:
#   OpenMPI (apt, if mpirun is missing) -> .venv with the pinned torch/torchvision and the rest of
#   requirements.txt -> Horovod 0.28.1 built from its PyPI sdist with our torch >= 2.1 patch (cached
#   wheel) -> this package (editable) -> `horovodrun --check-build` must show PyTorch, MPI and Gloo.
#
# Environment:
#   PYTHON=python3            interpreter for the venv (3.11 tested)
#   VENV=.venv                where the venv lives
#   HVD_MEGDET_CACHE=~/.cache/hvd_megdet   built Horovod wheels, keyed on horovod + torch + patch + GPU mode + arch list
#   HVD_MEGDET_GPU=auto|nccl|none   auto: NCCL when `nvidia-smi` sees a GPU; nccl on GPU clusters
#   HOROVOD_NCCL_HOME         NCCL to build against (default: the pip nvidia-nccl package torch brings)
#   HOROVOD_BUILD_CUDA_CC_LIST GPU architectures for Horovod's CUDA kernels, e.g. 80,90 (default: the GPUs
#                             nvidia-smi sees, else every arch >= 70 that nvcc supports: scripts/cuda_arch.sh)
#   CUDA_HOME                 CUDA toolkit root (default: found from nvcc, see find_cuda_home)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CACHE=${HVD_MEGDET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_megdet}
GPU_MODE=${HVD_MEGDET_GPU:-auto}
HOROVOD_VERSION=0.28.1
PATCH=scripts/patches/horovod-0.28.1-torch-cxx17-cxx20.patch

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi; }

# --- 1. MPI --------------------------------------------------------------------------------------
# Horovod's MPI controller needs the compiler wrapper and headers (libopenmpi-dev), not only mpirun.
if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null || ! command -v cmake >/dev/null; then
    log "mpirun, mpicc or cmake not found: installing OpenMPI (and cmake) from apt"
    if command -v apt-get >/dev/null && as_root true; then
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq libopenmpi-dev openmpi-bin cmake >/dev/null
    else
        die "OpenMPI is missing and cannot be installed here (needs apt-get and root or passwordless sudo).
       Install an MPI with its compiler wrappers (e.g. 'apt-get install libopenmpi-dev openmpi-bin',
       'module load openmpi', or 'conda install -c conda-forge openmpi') and run this again."
    fi
fi
log "MPI: $(mpirun --version 2>/dev/null | head -1)"

# --- 2. venv with the pinned packages ------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
PINS_HASH=$(sha256sum requirements.txt | cut -c1-16)
if [ "$(cat "$VENV/.pins-sha256" 2>/dev/null)" != "$PINS_HASH" ]; then
    log "installing requirements.txt (torch/torchvision from PyPI; pip's cache makes reruns fast)"
    "$PY" -m pip install -q --upgrade pip setuptools wheel
    # --no-index would be wrong here: the regular PyPI torch is wanted, never a local +cpu wheel.
    "$PY" -m pip install -q -r requirements.txt
    echo "$PINS_HASH" > "$VENV/.pins-sha256"
else
    log "requirements.txt already installed ($PINS_HASH)"
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
case "$TORCH_VERSION" in *+cpu*) die "torch $TORCH_VERSION is a CPU-only build: torchvision's ops will not load. Remove $VENV and rerun.";; esac

# --- 3. Horovod ----------------------------------------------------------------------------------
# find_cuda_home and cuda_arch_list (shared with scripts/gpu_env.sh)
source "$ROOT/scripts/cuda_arch.sh"
if [ "$GPU_MODE" = auto ]; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then GPU_MODE=nccl; else GPU_MODE=none; fi
    log "HVD_MEGDET_GPU=auto -> $GPU_MODE ($( [ $GPU_MODE = nccl ] && echo 'nvidia-smi sees a GPU' || echo 'no GPU visible'))"
fi
case "$GPU_MODE" in nccl|none) ;; *) die "HVD_MEGDET_GPU must be auto, nccl or none, got '$GPU_MODE'";; esac

build_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j"$(getconf _NPROCESSORS_ONLN)")
CUDA_ROOT=""
CC_LIST=none  # no CUDA kernels in Horovod
if [ -n "$TORCH_CUDA" ] && command -v nvcc >/dev/null; then
    # A CUDA-enabled torch makes Horovod's CMake take its CUDA path; it needs the real toolkit root
    # and an architecture that this nvcc supports, even on a machine without a GPU.
    CUDA_ROOT=$(find_cuda_home)
    [ -n "$CUDA_ROOT" ] || die "torch is built with CUDA $TORCH_CUDA and nvcc is on PATH, but no CUDA toolkit root
       (a directory with include/cuda_runtime.h) was found: set CUDA_HOME"
    # Built for the GPUs that will run it: the user's list, this node's GPUs, or (a login node) every
    # generation from Volta up, never one fixed generation.
    CC_LIST=$(cuda_arch_list) || die "no CUDA architecture list to build Horovod for (reason above)"
    log "CUDA: torch $TORCH_VERSION has CUDA $TORCH_CUDA; nvcc=$(command -v nvcc) -> toolkit root $CUDA_ROOT; arch list $CC_LIST"
    build_env+=(HOROVOD_CUDA_HOME="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" HOROVOD_BUILD_CUDA_CC_LIST="$CC_LIST")
elif [ -n "$TORCH_CUDA" ]; then
    log "CUDA: torch has CUDA $TORCH_CUDA but no nvcc: Horovod builds CPU operations only"
fi
if [ "$GPU_MODE" = nccl ]; then
    NCCL_HOME=${HOROVOD_NCCL_HOME:-$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)}
    [ -n "$NCCL_HOME" ] && [ -d "$NCCL_HOME/include" ] || die "HVD_MEGDET_GPU=nccl but no NCCL found: set HOROVOD_NCCL_HOME"
    [ -e "$NCCL_HOME/lib/libnccl.so" ] || ln -sf "$(ls "$NCCL_HOME"/lib/libnccl.so.* | head -1)" "$NCCL_HOME/lib/libnccl.so"
    log "NCCL: $NCCL_HOME"
    build_env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$NCCL_HOME")
fi

PATCH_HASH=$(sha256sum "$PATCH" | cut -c1-12)
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# The arch list is part of the key: a wheel built for an A100 node has no kernels for an H100 node.
KEY="horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION-patch-$PATCH_HASH-gpu-$GPU_MODE-cc-${CC_LIST//,/_}-$PY_TAG"
STAMP="$VENV/.horovod-key"
WHEEL_DIR="$CACHE/wheels/$KEY"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$KEY" ] && "$PY" -c 'import horovod.torch' 2>/dev/null; then
    log "Horovod already installed ($KEY)"
else
    if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
        log "building Horovod $HOROVOD_VERSION for torch $TORCH_VERSION (~6 min on 2 cores); cache key $KEY"
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
        tar xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
        patch -d "$work/horovod-$HOROVOD_VERSION" -p1 --forward < "$PATCH"
        # cmake must come from the system or the venv; --no-build-isolation builds against our torch.
        (cd "$work/horovod-$HOROVOD_VERSION" && env "${build_env[@]}" PATH="$VENV/bin:$PATH" \
            "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" . > "$work/build.log" 2>&1) || {
            tail -40 "$work/build.log" >&2; die "Horovod build failed (log above; full log was in $work/build.log)"; }
        mkdir -p "$CACHE/wheels"
        tmp_dir="$WHEEL_DIR.tmp.$$"
        mkdir -p "$tmp_dir" && cp "$work"/dist/horovod-*.whl "$tmp_dir/" && rm -rf "$WHEEL_DIR" && mv "$tmp_dir" "$WHEEL_DIR"
    else
        log "using cached Horovod wheel $WHEEL_DIR"
    fi
    "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
    echo "$KEY" > "$STAMP"
fi

# --- 4. this package -----------------------------------------------------------------------------
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null

# --- 5. check ------------------------------------------------------------------------------------
check=$("$VENV/bin/horovodrun" --check-build)
echo "$check" | sed -n '/Available Frameworks/,$p'
for item in PyTorch MPI Gloo; do
    echo "$check" | grep -q "\[X\] $item" || die "horovodrun --check-build does not show $item"
done
log "ready: $VENV (torch $TORCH_VERSION, Horovod $HOROVOD_VERSION with PyTorch, MPI and Gloo)"
