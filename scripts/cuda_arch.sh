#!/usr/bin/env bash
# The GPU architectures to build Horovod's CUDA kernels for (HOROVOD_BUILD_CUDA_CC_LIST), in order:
#   1. HOROVOD_BUILD_CUDA_CC_LIST, if the user set it (comma-separated, e.g. 80,90);
#   2. the compute capabilities of the GPUs `nvidia-smi --query-gpu=compute_cap` reports (a GPU node);
#   3. else (a login node without GPUs) every architecture from Volta (70) up that this nvcc compiles
#      for, so that one wheel serves V100, T4, A100, L40, H100 and what nvcc knows beyond.
# Every entry must be one `nvcc --list-gpu-arch` lists; anything else stops with the supported list.
# Horovod compiles machine code for each entry and PTX for the newest, which newer GPUs JIT-compile.
#
#   bash scripts/cuda_arch.sh                          prints the list; where it came from on stderr
#   source scripts/cuda_arch.sh && cuda_arch_list      the same as a function (scripts/setup.sh, gpu_env.sh)
#
# Also defines find_cuda_home, the toolkit root both build scripts give Horovod.
MIN_CUDA_ARCH=70  # Volta (V100): the oldest GPU generation clusters still run

_cuda_arch_join() {  # any of spaces, commas, newlines -> sorted, unique, comma-joined
    tr ' ,' '\n\n' | sed '/^$/d' | sort -n -u | paste -sd, -
}

find_cuda_home() {
    # The toolkit root is the directory whose include/ holds cuda_runtime.h. nvcc on PATH may be a
    # wrapper script outside the toolkit (this CI image), so follow links and read the wrapper.
    local c nvcc
    for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
        [ -n "$c" ] && [ -f "$c/include/cuda_runtime.h" ] && { echo "$c"; return; }
    done
    nvcc=$(command -v nvcc || true)
    if [ -n "$nvcc" ]; then
        c=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
        [ -f "$c/include/cuda_runtime.h" ] && { echo "$c"; return; }
        for c in $(grep -ao '/[^ "]*/bin/nvcc' "$nvcc" 2>/dev/null); do
            c=$(dirname "$(dirname "$(readlink -f "$c")")")
            [ -f "$c/include/cuda_runtime.h" ] && { echo "$c"; return; }
        done
    fi
    for c in /usr/local/cuda /usr/local/cuda-*; do
        [ -f "$c/include/cuda_runtime.h" ] && { echo "$c"; return; }
    done
}

cuda_arch_list() {
    local nvcc supported caps requested origin arch bad=()
    nvcc=$(command -v nvcc) || { echo "cuda_arch: nvcc is not on PATH" >&2; return 1; }
    supported=$(nvcc --list-gpu-arch 2>/dev/null | sed -n 's/^compute_\([0-9][0-9]*\)$/\1/p' | _cuda_arch_join)
    if [ -z "$supported" ]; then
        echo "cuda_arch: \`$nvcc --list-gpu-arch\` lists no compute_NN architecture (nvcc older than CUDA 11.6?);" \
             "set HOROVOD_BUILD_CUDA_CC_LIST" >&2
        return 1
    fi
    if [ -n "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ]; then
        requested=$HOROVOD_BUILD_CUDA_CC_LIST
        origin="HOROVOD_BUILD_CUDA_CC_LIST"
    elif caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null) && [ -n "$caps" ]; then
        requested=$(tr -d ' .' <<<"$caps")  # "8.0" -> 80, "12.0" -> 120; one line per GPU
        origin="nvidia-smi: GPUs of compute capability $(tr '\n' ' ' <<<"$caps" | sed 's/ *$//')"
    else
        requested=$(tr ',' '\n' <<<"$supported" | awk -v min="$MIN_CUDA_ARCH" '$1 >= min')
        origin="no GPU visible, so every architecture >= $MIN_CUDA_ARCH that $nvcc supports"
        if [ -z "$requested" ]; then
            echo "cuda_arch: $nvcc supports no architecture >= $MIN_CUDA_ARCH (it lists $supported)" >&2
            return 1
        fi
    fi
    for arch in $(tr ',' ' ' <<<"$requested"); do
        if ! [[ $arch =~ ^[0-9]+$ ]]; then
            echo "cuda_arch: '$arch' from $origin is not a compute capability: write them without the dot," \
                 "comma-separated, e.g. HOROVOD_BUILD_CUDA_CC_LIST=80,90" >&2
            return 1
        fi
        [[ ,$supported, == *,$arch,* ]] || bad+=("$arch")
    done
    if [ ${#bad[@]} -gt 0 ]; then
        echo "cuda_arch: $nvcc cannot compile for ${bad[*]} (from $origin); it supports $supported." \
             "Set HOROVOD_BUILD_CUDA_CC_LIST to a subset of those, or put a CUDA toolkit that supports" \
             "${bad[*]} first on PATH" >&2
        return 1
    fi
    requested=$(_cuda_arch_join <<<"$requested")
    echo "cuda_arch: $requested (from $origin)" >&2
    echo "$requested"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    cuda_arch_list
fi
