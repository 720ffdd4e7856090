"""jobs/slurm/megdet.sbatch under a real Slurm on the 2-host test cluster (tests/cluster.py): submitted with
sbatch in the CPU form jobs/README.md documents, 2 nodes x 2 ranks, read back through scontrol, sacct,
the job log and log.jsonl.

Preemption keeps the work on every node under every launcher (horovodrun, mpirun, srun), each stopped
every way Slurm stops a job, one after the other in one job:

    the time limit   the template's `--signal=B:USR1@180` (the job's limit is shortened while it runs):
                     the batch shell writes the stop file, and requeues the job once the ranks saved
    scontrol requeue Slurm's TERM to the batch shell and to every job step (mpirun's remote orted)
    scancel          the same TERMs, and the job ends
    resubmission     resumes from the last checkpoint and finishes

Every stop must leave one checkpoint at the same iteration on every rank of both nodes (log.jsonl's
"stop" record names each rank's host) before Slurm's SIGKILL (KillWait after its TERM), and the next
run must resume from exactly it. The training is smoke-sized (configs/smoke_cpu.yaml) and runs until
stopped; a test asserts no timing, it prints what it measured (pytest -s shows it).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.cluster import KILL_WAIT, LOCAL_SCRATCH
from tests.jobs._fakes import REPO_ROOT, SBATCH
from tests.jobs._run_log import RunLog

# The CPU form of the submission (jobs/README.md): no GPUs, one core per rank, 2 ranks per node.
CPU_FORM = ("--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=2")
# Smoke-sized training that runs until it is stopped: no periodic checkpoint, a log record per step.
TRAIN = ("train.max_iters=1000", "train.checkpoint_every=1000", "train.log_every=1", "train.progress=true",
         "data.num_workers=1")
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"}
STOPPED = "training stopped on request with a checkpoint (exit 143)"
JOB_TIMEOUT = 600  # seconds for any one event of a job (start-up on a loaded CI runner included)


class Job(RunLog):
    """One submitted job: its id, log file and OUTPUT_DIR."""

    def __init__(self, cluster, job_id: str, log: Path, out: Path):
        self.cluster, self.id, self.log, self.out = cluster, job_id, log, out

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def info(self) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, RunTime, ...)."""
        out = self.cluster.slurm("scontrol", "show", "job", "-o", self.id)
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def state(self) -> str:
        return self.info().get("JobState", "?")

    def sacct(self) -> list[str]:
        """The state of each run of the job (a requeued job has several), oldest first, from the
        job-completion log (`sacct --completion`; with slurmdbd a site runs `sacct -j ID -D`)."""
        out = self.cluster.slurm("sacct", "--completion", "-j", self.id, "-n", "-P", "-o", "State")
        return [line.strip() for line in out.splitlines() if line.strip()]

    def wait_for(self, predicate, what: str, timeout: float = JOB_TIMEOUT, abort=lambda: None) -> float:
        """Poll until ``predicate()``; returns the time it became true (0.2 s resolution). ``abort()``
        returning a message fails at once (what happened instead)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            failure = abort() or (f"timed out after {timeout:.0f} s" if time.monotonic() > deadline else None)
            if failure:
                raise AssertionError(f"job {self.id}: {failure} waiting for {what} (state {self.state()}); "
                                     f"log ends:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        return time.time()

    def wait_training(self, after_iter: int = 0) -> int:
        """Wait for a train record past ``after_iter``; returns the newest iteration logged."""
        self.wait_for(lambda: any(r["iter"] > after_iter for r in self.records("train")),
                      f"a training step after iteration {after_iter}")
        return self.records("train")[-1]["iter"]

    def wait_done(self) -> None:
        self.wait_for(lambda: self.state() not in ACTIVE, "the job to end")


@pytest.fixture
def submit(cluster, slurm_shards, tmp_path):
    """submit(*sbatch_options, sets=(...), **env) -> Job, as a user on the login node: from the repository
    root, with the environment of a login shell that has no venv active (jobs/env.sh activates the
    repository's) and the site's MPI settings (TCP over the cluster's network)."""
    jobs: list[Job] = []

    def _submit(*options: str, sets=TRAIN, out: Path | None = None, nodes: int = 2, **env: str) -> Job:
        out = out or tmp_path / "out"
        log = tmp_path / f"job{len(jobs)}.log"
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": os.environ.get("HOME", "/root"),
                "LANG": "C.UTF-8", "SLURM_CONF": str(cluster.conf), "CONFIG": "configs/smoke_cpu.yaml",
                "DATA_PATH": str(slurm_shards), "OUTPUT_DIR": str(out), **cluster.mpi_env(),
                "HOROVOD_ARGS": "--network-interface eth0"}
        job_id = cluster.slurm("sbatch", "--parsable", f"--nodes={nodes}", f"--output={log}", *CPU_FORM, *options,
                               str(SBATCH), *sets, env={**base, **env}, cwd=REPO_ROOT).strip().split(";")[0]
        jobs.append(Job(cluster, job_id, log, out))
        return jobs[-1]

    yield _submit
    for job in jobs:  # a failed test must not leave a job holding the nodes' CPUs
        if job.state() in ACTIVE:
            cluster.slurm("scancel", "--signal=KILL", "--full", job.id, check=False)
    for job in jobs:
        job.wait_for(lambda j=job: j.state() not in ACTIVE, "the job to end after scancel", timeout=120)


def _shorten_time_limit(job: Job) -> None:
    """Leave the running job 1-2 minutes: less than the template's USR1@180, so Slurm sends it at its
    next time-limit check (every 30 s or so)."""
    h, m, sec = (int(x) for x in job.info()["RunTime"].split("-")[-1].split(":"))
    minutes = h * 60 + m + (sec > 0) + 1
    job.cluster.slurm("scontrol", "update", f"JobId={job.id}", f"TimeLimit={minutes}")


def _stop(job: Job, kind: str) -> dict:
    """Stop the job ``kind``'s way (time-limit, requeue, scancel) and check what the trainer did: every
    rank of both nodes stopped at the iteration in flight, and that checkpoint was written before
    Slurm's SIGKILL. Returns the iteration and the seconds from the signal to the checkpoint."""
    log_start = len(job.text())
    saved_before, stops_before = len(job.records("checkpoint")), len(job.records("stop"))
    reached = job.records("train")[-1]["iter"]
    t_signal = time.time()
    if kind == "time-limit":
        _shorten_time_limit(job)
        t_signal = job.wait_for(lambda: "USR1: stop requested" in job.text()[log_start:], "the USR1 ahead of the limit")
        reached = job.records("train")[-1]["iter"]
        job.cluster.slurm("scontrol", "update", f"JobId={job.id}", "TimeLimit=UNLIMITED")  # for the next run
    elif kind == "requeue":
        job.cluster.slurm("scontrol", "requeue", job.id)
    else:
        job.cluster.slurm("scancel", job.id)

    def ended() -> bool:
        return "[megdet] slurm job:" in job.text()[log_start:] or job.state() not in ACTIVE

    def saved() -> list[dict]:
        return job.records("checkpoint")[saved_before:]

    # A stop slower than KillWait is SIGKILLed: the job then ends, or starts again, without a checkpoint.
    job.wait_for(lambda: len(job.records("stop")) > stops_before, "the stop record", abort=lambda: (
        f"no checkpoint within KillWait={KILL_WAIT} s: the job ended or restarted" if ended() and not saved() else None))
    assert len(saved()) == 1, saved()
    it = saved()[0]["iter"]
    stop = job.records("stop")[-1]
    # Every rank of both nodes stopped at the one iteration saved; at most the step in flight is lost.
    assert stop["iter"] == it >= reached
    assert [r["host"] for r in stop["ranks"]] == ["node01", "node01", "node02", "node02"], stop
    assert Path(saved()[0]["path"]).name == f"ckpt_{it:08d}.pt"
    assert not (job.out / "STOP").exists()  # consumed: a rerun does not stop at once
    timing = {"launcher": job.launcher, "stop": kind, "iter": it, "to_checkpoint_s": round(saved()[0]["time"] - t_signal, 1),
              "signalled": sum(r["signalled"] for r in stop["ranks"]), "file": any(r["file"] for r in stop["ranks"])}
    print(f"\n[timing] job {job.id}: {timing}")
    return timing


def _assert_resumed(job: Job, it: int) -> None:
    """The next run of the trainer started from ckpt_<it> and trained step it + 1 next."""
    runs = len([run for run in job.runs() if any(r["type"] == "stop" and r["iter"] == it for r in run)]) and \
        next(i for i, run in enumerate(job.runs()) if any(r["type"] == "stop" and r["iter"] == it for r in run)) + 1
    runs = runs or 1  # a resubmission into a stopped run: its first run is the next one
    job.wait_for(lambda: len(job.runs()) > runs and any(r["type"] == "train" for r in job.runs()[-1]),
                 "the next run to train a step", abort=lambda: "the job ended" if job.state() not in ACTIVE else None)
    run = job.runs()[-1]
    assert run[0]["start_iter"] == it
    assert next(r["iter"] for r in run if r["type"] == "train") == it + 1
    assert f"resumed from {job.out / 'checkpoints' / f'ckpt_{it:08d}.pt'} at iteration {it}" in job.text()


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun", "srun"])
def test_a_two_node_job_keeps_its_work_through_every_stop(cluster, submit, slurm_shards, launcher):
    job = submit(LAUNCHER=launcher)
    job.launcher = launcher
    job.wait_training()
    assert re.search(rf"\[megdet\] running: {launcher} .*(-np |--ntasks=)4", job.text()), job.text()[-3000:]
    assert job.runs()[0][0]["hosts"] == 2 and job.runs()[0][0]["bn_size"] == 2

    first = _stop(job, "time-limit")
    job.wait_for(lambda: "USR1: requeueing job" in job.text(), "the batch shell to requeue the job")
    _assert_resumed(job, first["iter"])
    second = _stop(job, "requeue")
    _assert_resumed(job, second["iter"])
    assert int(job.info()["Restarts"]) >= 2
    third = _stop(job, "scancel")
    job.wait_done()
    assert job.info()["JobState"] == "CANCELLED"

    # The same submission again (a few steps more) resumes from that checkpoint and finishes; under srun
    # it first stages the shards to every node's local disk, and each node trains from its own copy.
    total = third["iter"] + 2
    sets = tuple(s for s in TRAIN if not s.startswith("train.max_iters=")) + (f"train.max_iters={total}",)
    stage = {"STAGE_DATA": "1", "LOCAL_SCRATCH": LOCAL_SCRATCH} if launcher == "srun" else {}
    again = submit(sets=sets, LAUNCHER=launcher, **stage)
    again.launcher = launcher
    again.wait_done()
    assert again.sacct()[-1] == "COMPLETED", again.text()[-3000:]
    _assert_resumed(again, third["iter"])
    assert [r["iter"] for r in again.runs()[-1] if r["type"] == "train"] == list(range(third["iter"] + 1, total + 1))
    assert (again.out / "finished.json").is_file()
    if stage:
        assert f"data.train_path={LOCAL_SCRATCH}/hvd_megdet/{slurm_shards.name}" in again.text()
        for host in cluster.hosts:  # each node's own disk holds a whole copy
            local = cluster.scratch(host) / "hvd_megdet" / slurm_shards.name
            assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in slurm_shards.iterdir())
    # A batch log is read in a file: plain progress lines, no carriage-return bar.
    log = again.log.read_bytes()
    assert b"\r" not in log
    assert re.search(rb"INFO train %d/%d \(100%%\)" % (total, total), log), log[-3000:]

    if launcher == "srun":  # a third submission into the finished run stops at once, saying so in one line
        third_job = submit(sets=sets, LAUNCHER=launcher)
        third_job.wait_done()
        assert third_job.state() == "FAILED"
        errors = [line for line in third_job.text().splitlines() if "error" in line]
        assert len(errors) == 1 and "holds a finished run" in errors[0] and "EXTEND=1" in errors[0], third_job.text()
        assert "running:" not in third_job.text()


def test_ranks_per_node_must_match_what_slurm_granted(submit):
    job = submit("--ntasks-per-node=1", nodes=1, GPUS_PER_NODE="2")
    job.wait_done()
    assert job.state() == "FAILED"
    assert re.search(r"\[megdet\] error: 2 ranks per node but Slurm granted 1 tasks on \S+ \(SLURM_TASKS_PER_NODE=1\): "
                     r"submit with --ntasks-per-node=2", job.text()), job.text()
    assert "running:" not in job.text()


def test_a_missing_launcher_names_jobs_env_sh(submit):
    job = submit(nodes=1, MEGDET_VENV="")  # env.sh activates no venv, and none is on PATH
    job.wait_done()
    assert job.state() == "FAILED"
    errors = [line for line in job.text().splitlines() if line.startswith("[megdet] error")]
    assert len(errors) == 1 and "horovodrun ('horovodrun') is not on PATH" in errors[0] and "jobs/env.sh" in errors[0], job.text()
