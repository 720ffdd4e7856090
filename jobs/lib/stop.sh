# shellcheck shell=bash
# Running the launcher and passing a stop request on to the ranks, sourced by jobs/lib/launch.sh:
# megdet_run SCHEDULER COMMAND... runs COMMAND and returns its exit status.

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
