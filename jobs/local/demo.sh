#!/usr/bin/env bash
# The embedded demo (`make demo`): a synthetic COCO split -> HDF5 shards -> MegDet training on 2 CPU
# ranks with CGBN and warm-up (jobs/local/run.sh, configs/demo_cpu.yaml) -> COCO evaluation.
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
NP=${NP:-2} CONFIG=configs/demo_cpu.yaml DATA_PATH="$DATA/shards/train" VAL_PATH="$DATA/shards/val" \
    OUTPUT_DIR="$OUT" bash jobs/local/run.sh "$@"

"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from hvd_megdet.metrics import read_log
out = Path(sys.argv[1])
train = read_log(out / "log.jsonl", "train")
evals = read_log(out / "log.jsonl", "eval")
print("\n[demo] summary")
if train:
    print(f"  training loss: {train[0]['loss']:.3f} at iteration {train[0]['iter']} -> "
          f"{train[-1]['loss']:.3f} at iteration {train[-1]['iter']} (lr {train[-1]['lr']:.4g})")
if evals:
    e = evals[-1]
    print(f"  COCO eval after epoch {e['epoch']}: mmAP {e['mmAP']:.3f}  AP50 {e['AP50']:.3f}  mmAR {e['mmAR']:.3f}")
print(f"  log:         {out / 'log.jsonl'}")
print(f"  config:      {out / 'config.yaml'}")
print(f"  checkpoints: {out / 'checkpoints'}/")
print(f"  plot:        {out / 'loss.svg'}")
evaluated = sorted(out.glob("eval_epoch*/metrics.json"))
if evaluated:
    print(f"  metrics:     {evaluated[-1]}")
PY
