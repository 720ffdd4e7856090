# shellcheck shell=bash
# The launch logic shared by jobs/slurm/megdet.sbatch, jobs/pbs/megdet.pbs and jobs/local/run.sh.
#
# Sourced, not executed. The caller sets MEGDET_ROOT (the repository root) and calls
#     megdet_main slurm|pbs|local [key=value ...]
# which reads the scheduler's host list, checks the allocation, the software and the output
# directory, renders one launcher command line (horovodrun, mpirun or srun) around
# `python -m hvd_megdet.train`, and runs it, passing a stop request (requeue, time limit, preemption,
# scancel) on to the training ranks; with MEGDET_DRY_RUN=1 it prints the command lines instead. Every
# variable it reads is documented in jobs/README.md and at the top of each template. Nothing runs
# when this file is sourced. Written for bash >= 4.2 (RHEL/CentOS 7): an array that may be empty is
# expanded as ${a[@]+"${a[@]}"}, since `set -u` rejects a bare "${a[@]}" of an empty array before 4.4.

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

# MEGDET_DRY_RUN=1: print the command lines, run nothing.
megdet_dry_run() { [[ ${MEGDET_DRY_RUN:-0} == 1 ]]; }

# Host lists (megdet_collect_hosts), and running the launcher with the stop request (megdet_run).
_megdet_lib=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=hosts.sh
source "$_megdet_lib/hosts.sh"
# shellcheck source=stop.sh
source "$_megdet_lib/stop.sh"

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
        if ! [[ $index =~ ^[0-9]+$ ]] || ((10#$index >= ${#names[@]})); then
            megdet_die "array index '$index' is outside the ${#names[@]} configs of $list"
        fi
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
    local msg
    msg="$(basename "$CONFIG") is a Table 3 row run on $expected GPUs, but this job has $MEGDET_NP ranks"
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
    # Open MPI's mpirun refuses to start as root (containers, CI) unless told; horovodrun passes
    # --allow-run-as-root itself.
    if [[ $(id -u) == 0 ]]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
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
    sets+=(${extra[@]+"${extra[@]}"} "$@")
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
            MEGDET_CMD=("${HOROVODRUN:-horovodrun}" -np "$MEGDET_NP" -H "$MEGDET_HOST_SPEC" ${extra[@]+"${extra[@]}"})
            ;;
        mpirun)
            # Horovod's recommended Open MPI flags: no core binding (each rank runs many threads),
            # ranks filled host by host, the TCP/shared-memory transport unless MPIRUN_ARGS says otherwise
            # (set but empty: no transport flags).
            read -r -a extra <<<"${MPIRUN_ARGS--mca pml ob1 -mca btl ^openib}"
            local exports=()
            mapfile -t exports < <(megdet_mpirun_exports)
            MEGDET_CMD=("${MPIRUN:-mpirun}" -np "$MEGDET_NP" -H "$MEGDET_HOST_SPEC" -bind-to none -map-by slot
                ${extra[@]+"${extra[@]}"} ${exports[@]+"${exports[@]}"})
            ;;
        srun)
            [[ $scheduler == slurm ]] || megdet_die "LAUNCHER=srun needs a Slurm job (this is $scheduler)"
            local n
            for n in "${MEGDET_SLOTS[@]}"; do
                [[ $n == "${MEGDET_SLOTS[0]}" ]] || megdet_die "srun needs the same ranks on every node (${MEGDET_SLOTS[*]})"
            done
            read -r -a extra <<<"${SRUN_ARGS:-}"
            MEGDET_CMD=("${SRUN:-srun}" "--mpi=${SRUN_MPI:-pmix}" "--nodes=$MEGDET_NNODES" "--ntasks=$MEGDET_NP"
                "--ntasks-per-node=${MEGDET_SLOTS[0]}" --cpu-bind=none --kill-on-bad-exit=1 ${extra[@]+"${extra[@]}"})
            ;;
        *) megdet_die "LAUNCHER must be horovodrun, mpirun or srun (got '$launcher')" ;;
    esac
    MEGDET_CMD+=("${MEGDET_TRAIN[@]}")
}

# ---------------------------------------------------------------------------------------------------
# Checks before launching: each failure is one line saying what to change
# ---------------------------------------------------------------------------------------------------
# The output directory train.py will use: OUTPUT_DIR unless an override sets train.output_dir (the
# last one wins, as in train.py).
megdet_effective_output_dir() {
    local extra=() kv
    read -r -a extra <<<"${EXTRA_SETS:-}"
    MEGDET_OUTPUT_DIR=$OUTPUT_DIR
    for kv in ${extra[@]+"${extra[@]}"} "$@"; do
        if [[ $kv == train.output_dir=* ]]; then MEGDET_OUTPUT_DIR=${kv#*=}; fi
    done
}

# train.py writes finished.json when a run has trained (and evaluated) its whole schedule. A new job
# on that directory would "resume" into zero iterations: refuse, unless EXTEND=1 says to continue it
# (with a larger train.max_iters). A requeued job whose earlier run finished has nothing left to do.
megdet_check_output_dir() {
    local finished=$MEGDET_OUTPUT_DIR/finished.json
    [[ -f $finished ]] || return 0
    if [[ ${EXTEND:-0} == 1 ]]; then
        megdet_log "EXTEND=1: continuing the finished run in $MEGDET_OUTPUT_DIR"
    elif [[ ${SLURM_RESTART_COUNT:-0} != 0 ]] || megdet_pbs_rerun; then
        megdet_log "$MEGDET_OUTPUT_DIR finished in an earlier run of this job ($finished): nothing to do"
        exit 0
    else
        megdet_die "$MEGDET_OUTPUT_DIR holds a finished run ($finished): set OUTPUT_DIR to a new directory, or EXTEND=1 (with a larger train.max_iters) to continue it"
    fi
}

# The launcher, and a Python that imports hvd_megdet and Horovod, must be on PATH here; when they are
# not, the environment is usually one that jobs/env.sh does not activate.
megdet_check_software() {
    local exe var
    case $1 in
        horovodrun) exe=${HOROVODRUN:-horovodrun} var=HOROVODRUN ;;
        mpirun) exe=${MPIRUN:-mpirun} var=MPIRUN ;;
        srun) exe=${SRUN:-srun} var=SRUN ;;
        *) return 0 ;;  # megdet_launch_command names the valid ones
    esac
    command -v "$exe" >/dev/null 2>&1 ||
        megdet_die "$1 ('$exe') is not on PATH: activate the environment that has it in jobs/env.sh (module load, conda activate or source .venv/bin/activate), or set $var"
    local python=${PYTHON:-python} err
    command -v "$python" >/dev/null 2>&1 ||
        megdet_die "Python ('$python') is not on PATH: activate the environment that has hvd_megdet's dependencies in jobs/env.sh, or set PYTHON"
    if ! err=$("$python" -c 'import hvd_megdet, horovod' 2>&1); then
        megdet_die "$(command -v "$python") cannot import hvd_megdet and horovod (${err##*$'\n'}): activate the environment that has them in jobs/env.sh, or set PYTHON"
    fi
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
    MEGDET_LAUNCHER=${LAUNCHER:-horovodrun}

    megdet_collect_hosts "$scheduler"
    if [[ $scheduler == slurm ]]; then megdet_check_slurm_grant; fi
    megdet_check_table3_gpus
    megdet_setup_env
    megdet_stop_grace "$scheduler"
    megdet_log "$scheduler job: $MEGDET_NNODES node(s) x ranks [${MEGDET_SLOTS[*]}] = $MEGDET_NP ranks;" \
        "config $CONFIG; output $OUTPUT_DIR; OMP_NUM_THREADS=$OMP_NUM_THREADS"
    megdet_effective_output_dir "$@"
    megdet_check_output_dir
    megdet_dry_run || megdet_check_software "$MEGDET_LAUNCHER"

    if [[ -n ${DATA_PATH:-} ]]; then
        [[ -f $DATA_PATH/manifest.json ]] || megdet_die "DATA_PATH '$DATA_PATH' has no manifest.json (write shards with data_prep first)"
        if [[ ${STAGE_DATA:-0} == 1 ]]; then
            local dst
            dst=${LOCAL_SCRATCH:-${TMPDIR:-/tmp}}/hvd_megdet/$(basename "$DATA_PATH")
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
    mkdir -p "$MEGDET_OUTPUT_DIR"
    if [[ $scheduler == pbs && -n ${PBS_JOBID:-} ]]; then printf '%s\n' "$PBS_JOBID" >"$MEGDET_OUTPUT_DIR/pbs_job_id"; fi
    megdet_log "running: $(megdet_quote "${MEGDET_CMD[@]}")"
    megdet_run "$scheduler" "${MEGDET_CMD[@]}"
}
