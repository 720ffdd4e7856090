#!/usr/bin/env bash
# The embedded demo (`make demo`): a synthetic COCO split -> HDF5 shards -> MegDet training on 2 CPU
# ranks with CGBN and warm-up (jobs/local/run.sh, configs/demo_cpu.yaml) -> COCO evaluation ->
# detections drawn on the validation images -> the report table and figures (printed at the end).
#
# Environment: DEMO_DATA (default data/synthetic), OUTPUT_DIR (default runs/demo),
#   DEMO_TRAIN_IMAGES / DEMO_VAL_IMAGES / DEMO_SIZE (default 48 / 24 / 160x120), NP (default 2).
# Extra arguments are config overrides, e.g.  jobs/local/demo.sh train.max_iters=20
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
DATA=${DEMO_DATA:-data/synthetic}
OUT=${OUTPUT_DIR:-runs/demo}
SIZE=${DEMO_SIZE:-160x120}

make_split() {  # split images seed
    local split=$1 images=$2 seed=$3
    if [[ -f $DATA/shards/$split/manifest.json ]]; then
        echo "[demo] $DATA/shards/$split exists: reusing it"
        return
    fi
    "$PY" -m data_prep.synthetic --out "$DATA/raw_$split" --images "$images" --size "$SIZE" --seed "$seed" --split "$split"
    "$PY" -m data_prep.coco_to_hdf5 --images "$DATA/raw_$split/images" \
        --annotations "$DATA/raw_$split/annotations/instances_$split.json" --out "$DATA/shards/$split" --images-per-shard 32
}
make_split train "${DEMO_TRAIN_IMAGES:-48}" 1
make_split val "${DEMO_VAL_IMAGES:-24}" 2

# CPU ranks that fill every core: negotiate less often and let MPI yield while it waits, so
# Horovod's background threads take less CPU from training (benchmarks/bench_train.py: 1.24x -> 1.54x).
export HOROVOD_CYCLE_TIME=${HOROVOD_CYCLE_TIME:-10} OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
if [[ -f $OUT/finished.json && ${EXTEND:-0} != 1 ]]; then
    # run.sh refuses a finished run; the demo shows it again instead (rm -r it to train anew).
    echo "[demo] $OUT holds a finished run: showing it (rm -r $OUT to train again)"
else
    NP=${NP:-2} CONFIG=configs/demo_cpu.yaml DATA_PATH="$DATA/shards/train" VAL_PATH="$DATA/shards/val" \
        OUTPUT_DIR="$OUT" bash jobs/local/run.sh "$@"
fi

# What a person looks at afterwards: the trained detector's boxes on the validation images, then the
# paper's table and figures for this run (hvd_megdet.tools.report; training writes the same at its end).
CKPT=$(ls "$OUT"/checkpoints/ckpt_*.pt 2>/dev/null | tail -n 1 || true)
if [[ -n $CKPT ]]; then
    echo
    echo "[demo] detections of $CKPT on $DATA/shards/val"
    "$PY" -m hvd_megdet.tools.predict --checkpoint "$CKPT" --shards "$DATA/shards/val" --out "$OUT/predictions" \
        --score-thresh 0.5 --device cpu
fi
echo
echo "[demo] report: $PY -m hvd_megdet.tools.report $OUT"
"$PY" -m hvd_megdet.tools.report "$OUT" --out "$OUT/report"
