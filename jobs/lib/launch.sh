# shellcheck shell=bash
# The launch logic shared by jobs/slurm/megdet.sbatch, jobs/pbs/megdet.pbs and jobs/local/run.sh.
#
# Sourced, not executed. The caller sets MEGDET_ROOT (the repository root) and calls
#     megdet_main slurm|pbs|local [key=value ...]
# which reads the scheduler's host list, renders one launcher command line (horovodrun, mpirun or
# srun) around `python -m hvd_megdet.train`, and runs it; with MEGDET_DRY_RUN=1 it prints the
# command lines instead (that is what tests/jobs checks). Every variable it reads is documented in
# jobs/README.md and at the top of each template. Nothing runs when this file is sourced.

megdet_log() { printf '[megdet] %s\n' "$*" >&2; }
megdet_die() { megdet_log "error: $*"; exit 1; }

# Print a command on one line, quoted as Python's shlex.join does, so it can be pasted into a shell.
megdet_quote() {
    local out="" word
    for word in "$@"; do
        [[ -n $word && $word != *[!A-Za-z0-9_@%+=:,./-]* ]] || word="'${word//\'/\'\"\'\"\'}'"
        out+="${out:+ }$word"
    done
    printf '%s\n' "$out"
}

# ---------------------------------------------------------------------------------------------------
# Host lists. Each fills MEGDET_HOSTS (unique hosts, scheduler order) and MEGDET_SLOTS (ranks each).
# ---------------------------------------------------------------------------------------------------
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
            local per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-8}}}
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
    MEGDET_HOST_SPEC=$spec MEGDET_NP=$np MEGDET_NNODES=${#MEGDET_HOSTS[@]}
}

# ---------------------------------------------------------------------------------------------------
# Config selection and the Table 3 sweep
# ---------------------------------------------------------------------------------------------------
# GPUs the paper used for a Table 3 config (prints nothing for other configs). "long" rows use the
# GPUs of their normal row.
megdet_table3_gpus() {
    case ${1%.yaml} in
        megdet_bs16_* | megdet_bs32_*) echo 8 ;;
        megdet_bs64_*) echo 16 ;;
        megdet_bs128_*) echo 32 ;;
        megdet_bs256_bn32*) echo 64 ;;
        megdet_bs256_bn16*) echo 128 ;;
    esac
}

# Config names from CONFIG_LIST, one per line; blank lines and '#' comments are skipped.
megdet_config_names() {
    sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's/^[[:space:]]*//' "$1" | grep -v '^$' || true
}

# Sets CONFIG: in an array task (or with CONFIG_INDEX) the INDEX-th line (0-based) of CONFIG_LIST,
# looked up in CONFIG_DIR; otherwise CONFIG as given.
megdet_resolve_config() {
    local index=${1:-}
    MEGDET_ARRAY_MODE=0
    if [[ -n $index ]]; then
        local list=${CONFIG_LIST:-$MEGDET_ROOT/jobs/table3_configs.txt} names
        [[ -r $list ]] || megdet_die "config list '$list' is not readable"
        mapfile -t names < <(megdet_config_names "$list")
        [[ $index =~ ^[0-9]+$ ]] && ((10#$index < ${#names[@]})) ||
            megdet_die "array index '$index' is outside the ${#names[@]} configs of $list"
        CONFIG=${CONFIG_DIR:-configs}/${names[10#$index]}
        MEGDET_ARRAY_MODE=1
        megdet_log "array task $index -> $CONFIG (from $list)"
    fi
    [[ -n ${CONFIG:-} ]] || megdet_die "set CONFIG=path/to/config.yaml (or submit as an array over CONFIG_LIST)"
    [[ -f $CONFIG ]] || megdet_die "config file '$CONFIG' not found (relative paths start at $MEGDET_ROOT)"
}

# A Table 3 row run on another GPU count is a different experiment: an error in the sweep, a warning
# for a single run (where a changed images-per-GPU may be intended).
megdet_check_table3_gpus() {
    local expected
    expected=$(megdet_table3_gpus "$(basename "$CONFIG")")
    [[ -z $expected || $expected == "$MEGDET_NP" ]] && return 0
    local msg="$(basename "$CONFIG") is a Table 3 row run on $expected GPUs, but this job has $MEGDET_NP ranks"
    if [[ $MEGDET_ARRAY_MODE == 1 && ${TABLE3_STRICT:-1} == 1 ]]; then
        megdet_die "$msg: submit it with $((expected / MEGDET_SLOTS[0])) nodes (jobs/submit_table3.sh does), or set TABLE3_STRICT=0"
    fi
    megdet_log "warning: $msg"
}

# ---------------------------------------------------------------------------------------------------
# Environment, data staging, command rendering
# ---------------------------------------------------------------------------------------------------
megdet_setup_env() {
    local cpus=${SLURM_CPUS_ON_NODE:-${NCPUS:-$(nproc)}}
    cpus=${cpus%%(*}
    # One rank per GPU: split the node's cores between its ranks so that intra-op threads (torch,
    # OpenCV, BLAS) of different ranks do not fight over the same cores.
    local threads=$((cpus / MEGDET_SLOTS[0]))
    export OMP_NUM_THREADS=${THREADS_PER_RANK:-$((threads > 0 ? threads : 1))}
    # Lustre/GPFS and NFS often lack the POSIX locks HDF5 takes even for read-only opens.
    export HDF5_USE_FILE_LOCKING=${HDF5_USE_FILE_LOCKING:-FALSE}
    # On SIGTERM (preemption, requeue) the ranks finish their iteration and write a checkpoint;
    # Open MPI's mpirun would SIGKILL them 1 s after forwarding the TERM, so give them a minute.
    export OMPI_MCA_odls_base_sigkill_timeout=${OMPI_MCA_odls_base_sigkill_timeout:-60}
    # `python -m hvd_megdet.train` works from a checkout without `pip install`.
    export PYTHONPATH=$MEGDET_ROOT${PYTHONPATH:+:$PYTHONPATH}
}

# The command that runs jobs/lib/stage_data.sh once on every node of the job.
megdet_stage_command() {
    local scheduler=$1 src=$2 dst=$3 script=$MEGDET_ROOT/jobs/lib/stage_data.sh
    case $scheduler in
        slurm) MEGDET_CMD=("${SRUN:-srun}" "--nodes=$MEGDET_NNODES" "--ntasks=$MEGDET_NNODES" --ntasks-per-node=1 bash "$script" "$src" "$dst") ;;
        pbs)
            local h spec=""
            for h in "${MEGDET_HOSTS[@]}"; do spec+="${spec:+,}$h:1"; done
            MEGDET_CMD=("${MPIRUN:-mpirun}" -np "$MEGDET_NNODES" -H "$spec" -bind-to none bash "$script" "$src" "$dst")
            ;;
        local) MEGDET_CMD=(bash "$script" "$src" "$dst") ;;
    esac
}

# `python -m hvd_megdet.train --config CONFIG --set k=v ...` into MEGDET_TRAIN. Overrides are applied
# by train.py in order, so the positional key=value arguments (last) win.
megdet_train_command() {
    local sets=()
    [[ -n ${DATA_PATH:-} ]] && sets+=("data.train_path=$DATA_PATH")
    [[ -n ${VAL_PATH:-} ]] && sets+=("data.val_path=$VAL_PATH")
    sets+=("train.output_dir=$OUTPUT_DIR")
    [[ -n ${IMAGES_PER_GPU:-} ]] && sets+=("data.images_per_rank=$IMAGES_PER_GPU")
    [[ -n ${BN_GROUP_SIZE:-} ]] && sets+=("model.bn_group_size=$BN_GROUP_SIZE")
    local extra=()
    read -r -a extra <<<"${EXTRA_SETS:-}"
    sets+=("${extra[@]}" "$@")
    local kv
    for kv in "${sets[@]}"; do [[ $kv == *=* ]] || megdet_die "override '$kv' is not key=value"; done
    MEGDET_TRAIN=("${PYTHON:-python}" -m hvd_megdet.train --config "$CONFIG" --set "${sets[@]}")
}

# -x NAME for every variable the ranks need: mpirun copies only what it is told to.
megdet_mpirun_exports() {
    local name
    for name in PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS HDF5_USE_FILE_LOCKING; do
        [[ -n ${!name+set} ]] && printf '%s\n' -x "$name"
    done
    compgen -e | grep -E '^(NCCL_|UCX_|HOROVOD_|HVD_MEGDET_)' | sort | while read -r name; do printf '%s\n' -x "$name"; done
}

# The launcher line for LAUNCHER=horovodrun|mpirun|srun into MEGDET_CMD.
megdet_launch_command() {
    local scheduler=$1 launcher=${LAUNCHER:-horovodrun} extra=()
    case $launcher in
        horovodrun)
            read -r -a extra <<<"${HOROVOD_ARGS:-}"
            MEGDET_CMD=("${HOROVODRUN:-horovodrun}" -np "$MEGDET_NP" -H "$MEGDET_HOST_SPEC" "${extra[@]}")
            ;;
        mpirun)
            # Horovod's recommended Open MPI flags: no core binding (each rank runs many threads),
            # ranks filled host by host, the TCP/shared-memory transport unless MPIRUN_ARGS says otherwise
            # (set but empty: no transport flags).
            read -r -a extra <<<"${MPIRUN_ARGS--mca pml ob1 -mca btl ^openib}"
            local exports
            mapfile -t exports < <(megdet_mpirun_exports)
            MEGDET_CMD=("${MPIRUN:-mpirun}" -np "$MEGDET_NP" -H "$MEGDET_HOST_SPEC" -bind-to none -map-by slot "${extra[@]}" "${exports[@]}")
            ;;
        srun)
            [[ $scheduler == slurm ]] || megdet_die "LAUNCHER=srun needs a Slurm job (this is $scheduler)"
            local n
            for n in "${MEGDET_SLOTS[@]}"; do
                [[ $n == "${MEGDET_SLOTS[0]}" ]] || megdet_die "srun needs the same ranks on every node (${MEGDET_SLOTS[*]})"
            done
            read -r -a extra <<<"${SRUN_ARGS:-}"
            MEGDET_CMD=("${SRUN:-srun}" "--mpi=${SRUN_MPI:-pmix}" "--nodes=$MEGDET_NNODES" "--ntasks=$MEGDET_NP"
                "--ntasks-per-node=${MEGDET_SLOTS[0]}" --cpu-bind=none --kill-on-bad-exit=1 "${extra[@]}")
            ;;
        *) megdet_die "LAUNCHER must be horovodrun, mpirun or srun (got '$launcher')" ;;
    esac
    MEGDET_CMD+=("${MEGDET_TRAIN[@]}")
}

# ---------------------------------------------------------------------------------------------------
# Running: print (dry run) or execute with signal handling
# ---------------------------------------------------------------------------------------------------
megdet_dry_run() { [[ ${MEGDET_DRY_RUN:-0} == 1 ]]; }

_megdet_forward() {
    [[ -n ${MEGDET_CHILD:-} ]] && kill -s "$1" "$MEGDET_CHILD" 2>/dev/null
    return 0
}

# Slurm sends USR1 (--signal=B:USR1@SECONDS) before the time limit; requeueing puts the same job id
# back in the queue, and train.py resumes from the latest checkpoint in OUTPUT_DIR.
_megdet_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts >= ${MAX_REQUEUES:-20})); then
        megdet_log "USR1: job already restarted $restarts times (MAX_REQUEUES), not requeueing"
    else
        megdet_log "USR1: time limit or preemption ahead, requeueing job ${SLURM_JOB_ID:-?} (restart $((restarts + 1)))"
        "${SCONTROL:-scontrol}" requeue "${SLURM_JOB_ID:?}" || megdet_log "warning: scontrol requeue failed"
    fi
    _megdet_forward TERM
}

# Run the launcher in the background and wait, so that signals reach our traps while it runs (bash
# defers traps until a foreground child exits). Returns the launcher's exit status.
megdet_run() {
    local scheduler=$1
    shift
    MEGDET_CHILD=""
    # PBS (qdel, preemption of a `-r y` job) and Slurm send TERM; pass it on so ranks exit cleanly.
    trap '_megdet_forward TERM' TERM
    # Background children of a non-interactive shell ignore INT, so Ctrl-C becomes TERM for them.
    trap '_megdet_forward TERM' INT
    [[ $scheduler == slurm ]] && trap '_megdet_requeue' USR1
    "$@" &
    MEGDET_CHILD=$!
    local rc
    while true; do
        wait "$MEGDET_CHILD" && rc=0 || rc=$?
        # > 128: a trapped signal interrupted `wait`; keep waiting while the launcher shuts down.
        ((rc > 128)) && kill -0 "$MEGDET_CHILD" 2>/dev/null && continue
        ((rc > 128)) && { wait "$MEGDET_CHILD" && rc=0 || rc=$?; }
        break
    done
    trap - TERM INT USR1
    return "$rc"
}

megdet_main() {
    local scheduler=$1
    shift
    [[ -n ${MEGDET_ROOT:-} && -f $MEGDET_ROOT/jobs/lib/launch.sh ]] ||
        megdet_die "MEGDET_ROOT='${MEGDET_ROOT:-}' is not the hvd_megdet checkout: submit from its root or set MEGDET_ROOT"
    cd "$MEGDET_ROOT" || megdet_die "cannot cd to $MEGDET_ROOT"

    local index=${CONFIG_INDEX:-}
    [[ $scheduler == slurm ]] && index=${SLURM_ARRAY_TASK_ID:-$index}
    [[ $scheduler == pbs ]] && index=${PBS_ARRAY_INDEX:-$index}
    megdet_resolve_config "$index"
    local stem
    stem=$(basename "$CONFIG")
    OUTPUT_DIR=${OUTPUT_DIR:-${OUTPUT_ROOT:-$MEGDET_ROOT/runs}/${stem%.*}}

    megdet_collect_hosts "$scheduler"
    megdet_check_table3_gpus
    megdet_setup_env
    megdet_log "$scheduler job: $MEGDET_NNODES node(s) x ranks [${MEGDET_SLOTS[*]}] = $MEGDET_NP ranks;" \
        "config $CONFIG; output $OUTPUT_DIR; OMP_NUM_THREADS=$OMP_NUM_THREADS"

    if [[ -n ${DATA_PATH:-} ]]; then
        [[ -f $DATA_PATH/manifest.json ]] || megdet_die "DATA_PATH '$DATA_PATH' has no manifest.json (write shards with data_prep first)"
        if [[ ${STAGE_DATA:-0} == 1 ]]; then
            local dst=${LOCAL_SCRATCH:-${TMPDIR:-/tmp}}/hvd_megdet/$(basename "$DATA_PATH")
            megdet_stage_command "$scheduler" "$DATA_PATH" "$dst"
            if megdet_dry_run; then megdet_quote "${MEGDET_CMD[@]}"; else
                megdet_log "staging $DATA_PATH to $dst on every node"
                "${MEGDET_CMD[@]}" || megdet_die "staging $DATA_PATH to $dst failed"
            fi
            DATA_PATH=$dst
        fi
    fi

    megdet_train_command "$@"
    megdet_launch_command "$scheduler"
    if megdet_dry_run; then
        megdet_quote "${MEGDET_CMD[@]}"
        return 0
    fi
    mkdir -p "$OUTPUT_DIR"
    megdet_log "running: $(megdet_quote "${MEGDET_CMD[@]}")"
    megdet_run "$scheduler" "${MEGDET_CMD[@]}"
}
