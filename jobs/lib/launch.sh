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

# ---------------------------------------------------------------------------------------------------
# Running: print (dry run) or execute, passing a stop request on to the ranks
# ---------------------------------------------------------------------------------------------------
# A stop request (requeue, time limit, preemption, scancel, qdel, Ctrl-C) becomes the file
# OUTPUT_DIR/STOP. Rank 0 looks for it before every step, on the shared file system that holds the
# checkpoints; through the per-step allreduce every rank on every node learns of it, they save one
# checkpoint at the same iteration and exit 143, and a rerun resumes from it (hvd_megdet/stop.py).
# A file needs no process tree and no launcher in between, so it works the same for horovodrun,
# mpirun and srun, on one node or many, under Slurm and PBS. Ranks that a scheduler signals itself
# (Slurm's job steps, PBS's job processes) stop on that SIGTERM too: the same stop, by two roads.
#
# What must not happen is a launcher killing the ranks while they save. Open MPI's daemons (the
# `orted` that mpirun starts on the other nodes, as a Slurm job step or over ssh) answer a TERM, or a
# cancelled step, by killing their ranks: SIGCONT, odls_base_sigkill_timeout seconds, then SIGTERM and
# SIGKILL (default 1 s: a 2-node requeue lost every checkpoint). The delay below gives the ranks that
# long to finish their step and save; the scheduler's own SIGKILL (Slurm's KillWait, PBS's
# kill_delay) still bounds it.
# On one machine (local) nothing cancels the ranks' daemons: Open MPI's own 1 s stands.
megdet_stop_grace() {
    local grace=120
    if [[ ${1:-} == pbs ]]; then grace=$(megdet_pbs_stop_grace); fi
    if [[ ${1:-} == local && -z ${STOP_GRACE:-} ]]; then return 0; fi
    export OMPI_MCA_odls_base_sigkill_timeout=${STOP_GRACE:-$grace}
}

# --- PBS (issue 20) ---------------------------------------------------------------------------------
# PBS sends qdel's, qrerun's and preemption's TERM to every process of the job on its first host,
# mpirun included, and SIGKILL kill_delay later (a queue attribute, 10 s unless set). mpirun and its
# daemons then sit out the grace twice with their event loop stopped (the ranks save, but cannot
# finalize) before killing the ranks; the daemons on the other hosts, which PBS does not know of (no
# tm support), end about 4 x the grace after the TERM. Half of kill_delay gives the ranks all the time
# PBS gives them, and leaves nothing running much longer than 2 x kill_delay (with 120 s: 8 minutes).
megdet_pbs_stop_grace() {
    local delay
    delay=$("${QSTAT:-qstat}" -Qf "${PBS_QUEUE:-}" 2>/dev/null | awk '$1 == "kill_delay" { print $3 }') || delay=""
    [[ $delay =~ ^[0-9]+$ ]] || delay=10
    echo $((delay / 2 > 0 ? delay / 2 : 1))
}

# A rerun PBS job (qrerun, preemption, a failed node) has no run count in its environment: the job
# notes its id in OUTPUT_DIR before training (megdet_main), and finding its own id there means that
# this run is a rerun of the job that trained into it.
megdet_pbs_rerun() {
    local noted=""
    [[ -n ${PBS_JOBID:-} && -f $MEGDET_OUTPUT_DIR/pbs_job_id ]] || return 1
    noted=$(<"$MEGDET_OUTPUT_DIR/pbs_job_id")
    [[ $noted == "$PBS_JOBID" ]]
}
# --- end PBS -----------------------------------------------------------------------------------------

# The traps below only write the file and set variables, and while they are set this shell expands
# no $( ) and never waits in `wait`: bash 5.2 (Debian 12) corrupts a trap taken during a $( )
# ("trap: line 2: unexpected EOF while looking for matching `)'") and can abandon one taken inside
# `wait` when another signal follows at once (tests/jobs/test_job_checks.py sends such bursts).
megdet_request_stop() {
    # State first: a trap for another signal may run inside this one, at its first external command.
    local why=$1 before=$MEGDET_STOP_WHY
    MEGDET_STOP_WHY=${MEGDET_STOP_WHY:-$why}
    [[ $why == USR1 ]] && MEGDET_REQUEUE=1
    if [[ $why == INT && -n $before ]]; then
        megdet_log "INT again: stopping the launcher now, without a checkpoint"
        kill -TERM "$MEGDET_CHILD" 2>/dev/null
        return 0
    fi
    # Written whole, then renamed: rank 0 never reads half a file.
    if ! { printf '%s\n' "$why" >"$MEGDET_STOP_FILE.tmp" && mv -f "$MEGDET_STOP_FILE.tmp" "$MEGDET_STOP_FILE"; }; then
        megdet_log "warning: could not write $MEGDET_STOP_FILE"
    fi
    [[ -n $before ]] ||
        megdet_log "$why: stop requested ($MEGDET_STOP_FILE): every rank saves a checkpoint at the same iteration and exits"
}

# Slurm sends USR1 (--signal=B:USR1@SECONDS) before the time limit: once the ranks have saved and the
# launcher has ended (no step is cancelled under ranks that are saving), the job is requeued under
# the same id and the next run resumes from the checkpoint.
megdet_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [[ -f $MEGDET_OUTPUT_DIR/finished.json ]]; then
        megdet_log "USR1: training finished meanwhile, not requeueing"
    elif ((restarts >= ${MAX_REQUEUES:-20})); then
        megdet_log "USR1: job already restarted $restarts times (MAX_REQUEUES), not requeueing"
    else
        megdet_log "USR1: requeueing job ${SLURM_JOB_ID:-?} (restart $((restarts + 1)))"
        "${SCONTROL:-scontrol}" requeue "${SLURM_JOB_ID:?}" || megdet_log "warning: scontrol requeue failed"
    fi
}

# `scancel --signal=TERM JOB` signals the job's steps only, never the batch shell. Under
# horovodrun/mpirun on one node the ranks are in no step, so a one-task step stands guard: its TERM
# becomes a TERM to this shell. It ends with the launcher.
_megdet_start_stop_guard() {
    local node=$1
    # shellcheck disable=SC2016  # expanded by the guard's shell: $0 this shell, $1 the launcher
    "${SRUN:-srun}" --overlap --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=1 \
        --nodelist="$node" --mpi=none --job-name=megdet-stop-guard \
        --quiet bash -c 'trap "kill -TERM $0 2>/dev/null; exit 0" TERM
            while kill -0 "$1" 2>/dev/null; do sleep 1; done' "$$" "$MEGDET_CHILD" </dev/null &
    MEGDET_GUARD=$!
}

# Run the launcher in the background (bash defers traps while a foreground child runs) and poll it
# with a foreground sleep; returns the launcher's exit status.
megdet_run() {
    local scheduler=$1
    shift
    MEGDET_CHILD="" MEGDET_GUARD="" MEGDET_STOP_WHY="" MEGDET_REQUEUE=0
    MEGDET_STOP_FILE=$MEGDET_OUTPUT_DIR/STOP
    rm -f "$MEGDET_STOP_FILE"  # a request meant for an earlier run of this job
    local node=${SLURMD_NODENAME:-}
    [[ -n $node ]] || node=$(hostname -s)
    # No $( ) from here until the traps are reset.
    trap 'megdet_request_stop TERM' TERM
    # Background children of a non-interactive shell ignore INT, so Ctrl-C reaches the ranks as a stop.
    trap 'megdet_request_stop INT' INT
    if [[ $scheduler == slurm ]]; then trap 'megdet_request_stop USR1' USR1; fi
    "$@" &
    MEGDET_CHILD=$!
    if [[ $scheduler == slurm && $MEGDET_LAUNCHER != srun ]]; then _megdet_start_stop_guard "$node"; fi
    while kill -0 "$MEGDET_CHILD" 2>/dev/null; do sleep 0.5 || true; done
    # The launcher has ended, so there is nothing left to stop: signals are ignored while `wait` reads
    # its status (a trap would interrupt `wait` and lose it).
    trap '' TERM INT USR1
    local rc=0
    wait "$MEGDET_CHILD" || rc=$?
    if [[ -n $MEGDET_GUARD ]]; then
        kill -KILL "$MEGDET_GUARD" 2>/dev/null || true
        wait "$MEGDET_GUARD" 2>/dev/null || true
    fi
    trap - TERM INT USR1
    # Ranks stopped through the file alone exit 0 (see hvd_megdet/train.py): unfinished is 143 here.
    if [[ -n $MEGDET_STOP_WHY && $rc == 0 && ! -f $MEGDET_OUTPUT_DIR/finished.json ]]; then rc=143; fi
    if ((rc == 143)); then
        megdet_log "training stopped on request with a checkpoint (exit 143): a requeued or resubmitted job with OUTPUT_DIR=$MEGDET_OUTPUT_DIR resumes from it"
    fi
    if ((MEGDET_REQUEUE == 1)); then megdet_requeue; fi
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
