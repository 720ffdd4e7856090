#!/usr/bin/env bash
# Submit the MegDet Table 3 sweep: jobs/submit_table3.sh slurm|pbs [extra sbatch/qsub options ...]
#
# Each row of CONFIG_LIST (default jobs/table3_configs.txt) needs the GPU count the paper used (8 to
# 128), and one Slurm job array cannot vary its node count. So Slurm gets one array per GPU count
# (rows 0,1,2,7,8 on 1 node; 3,9 on 2; ...), each task picking its row by SLURM_ARRAY_TASK_ID. PBS
# gets one job per row with CONFIG_INDEX set. Environment:
#   GPUS_PER_NODE   GPUs (= ranks) per node (default 8, as in the paper: BN groups span one node)
#   CPUS_PER_NODE   PBS only: ncpus in each select chunk (default 64)
#   CONFIG_LIST     the rows (default jobs/table3_configs.txt); DATA_PATH etc. pass to the jobs
#   MEGDET_DRY_RUN=1  print the sbatch/qsub commands instead of running them
set -euo pipefail
MEGDET_ROOT=${MEGDET_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export MEGDET_ROOT
# shellcheck source=lib/launch.sh
source "$MEGDET_ROOT/jobs/lib/launch.sh"

scheduler=${1:-}
[[ $scheduler == slurm || $scheduler == pbs ]] || { echo "usage: $0 slurm|pbs [sbatch/qsub options ...]" >&2; exit 2; }
shift
gpus_per_node=${GPUS_PER_NODE:-8}
list=${CONFIG_LIST:-$MEGDET_ROOT/jobs/table3_configs.txt}
mapfile -t names < <(megdet_config_names "$list")
((${#names[@]} > 0)) || megdet_die "no configs in $list"
((gpus_per_node == 8)) || megdet_log "warning: GPUS_PER_NODE=$gpus_per_node; the paper's BN groups are 8 GPUs (see jobs/README.md)"

# Row indices grouped by GPU count, in order of first appearance.
declare -A rows_of=()
gpu_counts=()
for i in "${!names[@]}"; do
    gpus=$(megdet_table3_gpus "${names[i]}")
    [[ -n $gpus ]] || megdet_die "${names[i]} (row $i of $list) is not a Table 3 config name"
    ((gpus % gpus_per_node == 0)) || megdet_die "${names[i]} needs $gpus GPUs, not a multiple of GPUS_PER_NODE=$gpus_per_node"
    [[ -n ${rows_of[$gpus]:-} ]] || gpu_counts+=("$gpus")
    rows_of[$gpus]+="${rows_of[$gpus]:+,}$i"
done

submit() {
    if megdet_dry_run; then megdet_quote "$@"; else "$@"; fi
}

if [[ $scheduler == slurm ]]; then
    for gpus in "${gpu_counts[@]}"; do
        submit "${SBATCH:-sbatch}" "--array=${rows_of[$gpus]}" "--nodes=$((gpus / gpus_per_node))" \
            "--ntasks-per-node=$gpus_per_node" "--gpus-per-node=$gpus_per_node" "$@" \
            "$MEGDET_ROOT/jobs/slurm/megdet.sbatch"
    done
else
    for i in "${!names[@]}"; do
        gpus=$(megdet_table3_gpus "${names[i]}")
        submit "${QSUB:-qsub}" -N "megdet_t3_$i" -v "CONFIG_INDEX=$i" \
            -l "select=$((gpus / gpus_per_node)):ncpus=${CPUS_PER_NODE:-64}:ngpus=$gpus_per_node:mpiprocs=$gpus_per_node" \
            "$@" "$MEGDET_ROOT/jobs/pbs/megdet.pbs"
    done
fi
