#!/usr/bin/env bash
# MegDet training on this machine, launched exactly as on a cluster node: jobs/local/run.sh [key=value ...]
#
#   jobs/local/run.sh train.max_iters=20                       # 2 ranks, configs/demo_cpu.yaml
#   NP=4 CONFIG=configs/megdet_bs16_bn16.yaml DATA_PATH=data/coco_h5/train2017 jobs/local/run.sh
#
# Environment:
#   NP              ranks (default 2), all on localhost
#   CONFIG          config file (default configs/demo_cpu.yaml)
#   DATA_PATH VAL_PATH OUTPUT_DIR IMAGES_PER_GPU BN_GROUP_SIZE EXTRA_SETS THREADS_PER_RANK
#                   as in jobs/slurm/megdet.sbatch (OUTPUT_DIR default runs/<config name>)
#   LAUNCHER        horovodrun | mpirun (default horovodrun; HOROVOD_ARGS=--gloo for Gloo)
#   PYTHON HOROVODRUN MPIRUN    default: the repository's .venv when it exists, else PATH
#   EXTEND=1        continue a run that finished in OUTPUT_DIR (with a larger train.max_iters)
#   MEGDET_DRY_RUN=1  print the command line instead of running it
set -euo pipefail
MEGDET_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export MEGDET_ROOT
: "${CONFIG:=configs/demo_cpu.yaml}"
if [[ -x $MEGDET_ROOT/.venv/bin/python ]]; then
    : "${PYTHON:=$MEGDET_ROOT/.venv/bin/python}"
fi
if [[ -x $MEGDET_ROOT/.venv/bin/horovodrun ]]; then
    : "${HOROVODRUN:=$MEGDET_ROOT/.venv/bin/horovodrun}"
fi
# shellcheck source=../lib/launch.sh
source "$MEGDET_ROOT/jobs/lib/launch.sh"
megdet_main local "$@"
