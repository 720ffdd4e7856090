#!/usr/bin/env bash
# Everything issue 11 needs from one lent GPU, in one device call of at most 10 minutes:
#   build Horovod (scripts/gpu_env.sh, from the carried .gpu_carry/), the CUDA tests, a 2-ranks-on-one-GPU
#   NCCL probe, then benchmarks/bench_gpu.py; logs and results under $OUT (at most 8 files come back).
#
#   device run:  command "bash scripts/gpu_session.sh", carry [".gpu_carry"], timeout_s 600
#   dry run on a CPU machine (tests skip, bench at toy sizes, NOT GPU figures):
#     OUT=/tmp/gpu_out PYTHON=.venv/bin/python GPU_PREFIX=/tmp/gpu_env HOROVOD_BUILD_CUDA_CC_LIST=90 \
#       GPU_BENCH_ARGS="--device cpu --tiny" GPU_SESSION_LIMIT=1500 GPU_BENCH_CAP=1200 bash scripts/gpu_session.sh
#
# What comes back in $OUT: session.log (machine, versions, phase results, the probe), build.log,
# the built Horovod wheel and horovod_key.txt (put the wheel in .gpu_carry/wheels/<key>/ and the next
# call installs it instead of building), test_cuda.log, bench_gpu.json (+ .profile.txt) and bench_gpu.log.
# Each phase runs under its own time cap, shortened to what the session has left, so an overrun still
# leaves the logs of the phases before it.
#
# Environment: OUT (default .gpu_out), GPU_SESSION_LIMIT=570 (seconds for the whole session),
#   GPU_SESSION_PHASES=build,tests,probe,bench (a rerun may drop some), GPU_BENCH_ARGS (extra
#   bench_gpu.py arguments), GPU_BENCH_CAP=300 (seconds), and everything scripts/gpu_env.sh reads.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/.gpu_out}
mkdir -p "$OUT"
LIMIT=${GPU_SESSION_LIMIT:-570}
PHASES=",${GPU_SESSION_PHASES:-build,tests,probe,bench},"
PREFIX=${GPU_PREFIX:-.gpu_env}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOG="$OUT/session.log"

say() { printf '[gpu_session %4ds] %s\n' "$SECONDS" "$*" | tee -a "$LOG"; }
# run_phase NAME CAP_SECONDS LOGFILE COMMAND...: the command under `timeout`, capped by the time left.
run_phase() {
    local name=$1 cap=$2 logfile=$3 left rc
    shift 3
    left=$((LIMIT - SECONDS - 5))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 20 ]; then say "$name: skipped, ${left}s left"; return 124; fi
    say "$name: start (cap ${cap}s) -> ${logfile##*/}"
    timeout --kill-after=10 "$cap" "$@" >> "$logfile" 2>&1
    rc=$?
    say "$name: rc=$rc$([ $rc = 124 ] && echo ' (timed out)') after $((SECONDS)) s in all"
    return $rc
}

say "machine: $(hostname), $(nproc) CPUs, $(free -g | awk '/^Mem/ {print $2}') GiB"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv 2>&1 || true
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
for name in ("torchvision", "mpi4py", "h5py", "numpy", "pillow", "pytest", "pytest-timeout", "nvidia-nccl-cu13", "cmake"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
  nvcc --version 2>&1 | tail -2; } >> "$LOG" 2>&1
cat "$LOG"

status=0
if [[ $PHASES == *,build,* ]]; then
    run_phase build 330 "$OUT/build.log" bash scripts/gpu_env.sh || status=1
    tail -25 "$OUT/build.log"
    [ -f "$PREFIX/build/build.log" ] && [ $status != 0 ] && { echo "--- Horovod build log (tail)"; tail -80 "$PREFIX/build/build.log"; } >> "$OUT/build.log"
    # The wheel comes back (if under the 16 MiB a file may be), so the next call need not build.
    key=$(cat "$PREFIX/.horovod-key" 2>/dev/null || true)
    wheel=$(ls "$PREFIX/wheels/$key"/horovod-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$key" ] && [ -n "$wheel" ]; then
        echo "$key" > "$OUT/horovod_key.txt"
        size=$(stat -c %s "$wheel")
        if [ "$size" -lt $((16 * 1024 * 1024)) ]; then cp "$wheel" "$OUT/"; fi
        say "Horovod wheel ${wheel##*/}: $((size / 1024)) KiB, key $key"
    fi
fi
if [ -f "$PREFIX/env.sh" ]; then
    # shellcheck disable=SC1091
    source "$PREFIX/env.sh"
else
    say "no $PREFIX/env.sh: Horovod was not built; tests and bench run without it"
fi

if [[ $PHASES == *,tests,* ]]; then
    timeout_flag=()
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && timeout_flag=(--timeout=150)
    run_phase tests 200 "$OUT/test_cuda.log" "$PYTHON" -m pytest -q -rs "${timeout_flag[@]}" tests/test_cuda.py || status=1
    tail -15 "$OUT/test_cuda.log" | tee -a "$LOG"
    # All skipped is a pass for pytest, but not for a GPU session.
    grep -q "passed" "$OUT/test_cuda.log" || { say "tests: none passed (all skipped or failed)"; status=1; }
fi

if [[ $PHASES == *,probe,* ]]; then
    # Issue 11, item 5: does Horovod (NCCL for CUDA tensors) accept 2 ranks on one GPU? NCCL usually
    # refuses a communicator with the same GPU twice; the answer goes into session.log either way.
    cat > "$OUT/.probe.py" <<'EOF'
import torch, horovod.torch as hvd
hvd.init()
t = torch.full((4,), float(hvd.rank() + 1), device="cuda:0")
r = hvd.allreduce(t, op=hvd.Sum, name="probe")
torch.cuda.synchronize()
print(f"rank {hvd.rank()}/{hvd.size()}: 2 ranks on cuda:0 through NCCL -> {r.tolist()} (expected 3.0 each)", flush=True)
EOF
    if run_phase probe 60 "$LOG" mpirun -np 2 --oversubscribe --bind-to none --allow-run-as-root \
            -x PATH -x PYTHONPATH -x LD_LIBRARY_PATH "$PYTHON" "$OUT/.probe.py"; then
        say "probe: 2 ranks on one GPU with NCCL work"
    else
        say "probe: 2 ranks on one GPU with NCCL FAILED (lines above)"
    fi
    rm -f "$OUT/.probe.py"
fi

if [[ $PHASES == *,bench,* ]]; then
    # shellcheck disable=SC2086
    run_phase bench "${GPU_BENCH_CAP:-300}" "$OUT/bench_gpu.log" "$PYTHON" benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" \
        --profile "hvd_cgbn1/bf16,hvd_frozen/fp32,tv_frozen/fp32" ${GPU_BENCH_ARGS:-} || status=1
    grep -v '^  round' "$OUT/bench_gpu.log" | tail -40 | tee -a "$LOG"
fi
say "done: status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
