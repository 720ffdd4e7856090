# shellcheck shell=bash
# Host lists, sourced by jobs/lib/launch.sh. megdet_collect_hosts fills MEGDET_HOSTS (unique hosts, in
# the scheduler's order) and MEGDET_SLOTS (ranks on each), MEGDET_HOST_SPEC, MEGDET_NP and MEGDET_NNODES;
# megdet_check_slurm_grant checks them against what Slurm granted.

# One host per line from SLURM_JOB_NODELIST ("node[01-04]"): scontrol knows every syntax the site's
# Slurm accepts; jobs/hostlist.py is the fallback on machines without it.
megdet_slurm_hostnames() {
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    [[ -n $nodelist ]] || megdet_die "SLURM_JOB_NODELIST is not set: run inside a Slurm allocation (sbatch/salloc)"
    if command -v "${SCONTROL:-scontrol}" >/dev/null 2>&1; then
        "${SCONTROL:-scontrol}" show hostnames "$nodelist"
    else
        "${PYTHON:-python3}" "$MEGDET_ROOT/jobs/hostlist.py" "$nodelist"
    fi
}

# "host count" per unique host of a PBS node file, in order of first appearance. PBS writes one line
# per MPI process (mpiprocs), so the count is the number of ranks PBS placed on that host.
megdet_pbs_host_counts() {
    local nodefile=$1
    [[ -r $nodefile ]] || megdet_die "PBS node file '$nodefile' is not readable: run inside a PBS job (qsub)"
    awk 'NF { if (!($1 in n)) order[++k] = $1; n[$1]++ } END { for (i = 1; i <= k; i++) print order[i], n[order[i]] }' "$nodefile"
}

megdet_collect_hosts() {
    local scheduler=$1 host count
    MEGDET_HOSTS=() MEGDET_SLOTS=()
    case $scheduler in
        slurm)
            # Ranks per node = GPUs per node; explicit GPUS_PER_NODE wins over what Slurm reports.
            # No GPUs (the CPU form, --gpus-per-node=0): one rank per task.
            local gpus=${SLURM_GPUS_ON_NODE:-}
            [[ ${gpus%%(*} == 0 ]] && gpus=""
            local per_node=${GPUS_PER_NODE:-${gpus:-${SLURM_NTASKS_PER_NODE:-8}}}
            per_node=${per_node%%(*}  # SLURM_NTASKS_PER_NODE may read "8(x4)"
            local names
            names=$(megdet_slurm_hostnames) || megdet_die "could not expand the Slurm node list"
            while read -r host; do
                [[ -z $host ]] || { MEGDET_HOSTS+=("$host") && MEGDET_SLOTS+=("$per_node"); }
            done <<<"$names"
            ;;
        pbs)
            local counts
            counts=$(megdet_pbs_host_counts "${PBS_NODEFILE:-}") || exit 1
            while read -r host count; do
                [[ -z $host ]] || { MEGDET_HOSTS+=("$host") && MEGDET_SLOTS+=("${GPUS_PER_NODE:-$count}"); }
            done <<<"$counts"
            ;;
        local)
            MEGDET_HOSTS=(localhost) MEGDET_SLOTS=("${NP:-2}")
            ;;
        *) megdet_die "unknown scheduler '$scheduler' (expected slurm, pbs or local)" ;;
    esac
    ((${#MEGDET_HOSTS[@]} > 0)) || megdet_die "the $scheduler host list is empty"
    local i spec="" np=0
    for i in "${!MEGDET_HOSTS[@]}"; do
        [[ ${MEGDET_SLOTS[i]} =~ ^[1-9][0-9]*$ ]] || megdet_die "bad slot count '${MEGDET_SLOTS[i]}' for host ${MEGDET_HOSTS[i]}"
        spec+="${spec:+,}${MEGDET_HOSTS[i]}:${MEGDET_SLOTS[i]}"
        np=$((np + MEGDET_SLOTS[i]))
    done
    # shellcheck disable=SC2034  # read by launch.sh
    MEGDET_HOST_SPEC=$spec MEGDET_NP=$np MEGDET_NNODES=${#MEGDET_HOSTS[@]}
}

# Slurm's per-node counts ("2(x3),1") as one number per node.
megdet_expand_counts() {
    local item k
    local -a items counts=()
    IFS=, read -r -a items <<<"$1"
    for item in ${items[@]+"${items[@]}"}; do
        if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            for ((k = 0; k < BASH_REMATCH[2]; k++)); do counts+=("${BASH_REMATCH[1]}"); done
        else
            counts+=("$item")
        fi
    done
    if ((${#counts[@]} > 0)); then printf '%s\n' "${counts[@]}"; fi
}

# One rank per GPU, and as many ranks on each node as Slurm granted tasks there (srun launches
# exactly those; horovodrun/mpirun would silently over- or under-fill the nodes instead).
megdet_check_slurm_grant() {
    local per_node=${MEGDET_SLOTS[0]} gpus=${SLURM_GPUS_ON_NODE:-}
    gpus=${gpus%%(*}
    if [[ $gpus =~ ^[1-9][0-9]*$ && $gpus != "$per_node" ]]; then
        megdet_die "$per_node ranks per node but Slurm granted $gpus GPUs per node: one rank per GPU, submit with --ntasks-per-node=$gpus (or set GPUS_PER_NODE=$gpus)"
    fi
    [[ -n ${SLURM_TASKS_PER_NODE:-} ]] || return 0
    local -a granted
    mapfile -t granted < <(megdet_expand_counts "$SLURM_TASKS_PER_NODE")
    local i
    for i in "${!MEGDET_HOSTS[@]}"; do
        [[ ${granted[i]:-} == "${MEGDET_SLOTS[i]}" ]] ||
            megdet_die "$per_node ranks per node but Slurm granted ${granted[i]:-no} tasks on ${MEGDET_HOSTS[i]} (SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE): submit with --ntasks-per-node=$per_node"
    done
}
