"""jobs/slurm/megdet.sbatch under a real Slurm (tests/jobs/slurm_cluster.py): submitted with sbatch in
the CPU form jobs/README.md documents, read back through sacct, scontrol and the job log.

Preemption keeps the work under every launcher, each stopped a different way (the ways share the
one mechanism in jobs/lib/launch.sh, `_megdet_stop`, which each test reaches by another path):

    horovodrun  `scontrol requeue`, then `scancel --signal=TERM` (the guard step) on the requeued run
    mpirun      the time limit: --time with the template's `--signal=B:USR1@...` (the script requeues)
    srun        `scancel --signal=TERM` (Slurm signals every process of the step, DataLoader workers
                too), then a resubmission resumes, finishes, and a third refuses the finished run

Every stop must leave one checkpoint at the iteration the ranks had reached (both ranks name it)
before Slurm's SIGKILL (KillWait after its TERM), and a next run that resumes from exactly it. The
training is smoke-sized (configs/smoke_cpu.yaml, 64x96 px, one DataLoader worker per rank) and runs
until stopped; a test asserts no timing, it prints what it measured (pytest -s shows it).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from hvd_megdet.metrics import read_log
from tests.jobs._fakes import REPO_ROOT, SBATCH
from tests.jobs.slurm_cluster import KILL_WAIT

# The CPU form of the submission (jobs/README.md): no GPUs, one core per rank, 2 ranks on the node.
CPU_FORM = ("--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=2")
# Smoke-sized training that runs until it is stopped: no periodic checkpoint, a log record per step.
TRAIN = ("train.max_iters=1000", "train.checkpoint_every=1000", "train.log_every=1", "train.progress=true",
         "data.num_workers=1")
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"}
STOPPED = "training stopped on request with a checkpoint (exit 143)"
JOB_TIMEOUT = 600  # seconds for any one event of a job (start-up on a loaded CI runner included)


class Job:
    """One submitted job: its id, log file and OUTPUT_DIR."""

    def __init__(self, slurm, job_id: str, log: Path, out: Path):
        self.slurm, self.id, self.log, self.out = slurm, job_id, log, out

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def records(self, kind: str | None = None) -> list[dict]:
        path = self.out / "log.jsonl"
        return read_log(path, kind) if path.exists() else []

    def runs(self) -> list[list[dict]]:
        """log.jsonl split at each "start" record: one list per run of the trainer."""
        runs: list[list[dict]] = []
        for r in self.records():
            if r["type"] == "start":
                runs.append([])
            if runs:
                runs[-1].append(r)
        return runs

    def state(self) -> str:
        return self.slurm.job(self.id).get("JobState", "?")

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
def submit(slurm, slurm_shards, tmp_path):
    """submit(*sbatch_options, sets=(...), **env) -> Job, as a user: from the repository root, with the
    environment of a login shell that has no venv active (jobs/env.sh activates the repository's)."""
    jobs: list[Job] = []

    def _submit(*options: str, sets=TRAIN, out: Path | None = None, **env: str) -> Job:
        out = out or tmp_path / "out"
        log = tmp_path / f"job{len(jobs)}.log"
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": os.environ.get("HOME", "/root"),
                "LANG": "C.UTF-8", "SLURM_CONF": str(slurm.conf), "CONFIG": "configs/smoke_cpu.yaml",
                "DATA_PATH": str(slurm_shards), "OUTPUT_DIR": str(out)}
        job_id = slurm.run("sbatch", "--parsable", f"--output={log}", *CPU_FORM, *options, str(SBATCH), *sets,
                           env={**base, **env}, cwd=REPO_ROOT).strip().split(";")[0]
        jobs.append(Job(slurm, job_id, log, out))
        return jobs[-1]

    yield _submit
    for job in jobs:  # a failed test must not leave a job holding the node's CPUs
        if job.state() in ACTIVE:
            slurm.run("scancel", "--signal=KILL", "--full", job.id, check=False)
    for job in jobs:
        job.wait_for(lambda j=job: j.state() not in ACTIVE, "the job to end after scancel", timeout=120)


def _stop(job: Job, signal) -> dict:
    """Run ``signal()`` (or wait for the job to get one itself when it is None) and check what the
    trainer did: every rank stopped after one iteration and that checkpoint was written, before
    Slurm's SIGKILL; then the launcher exited 143, unless KillWait ran out after the checkpoint (a
    kill then loses nothing: the file is renamed into place whole). Returns the iteration and the
    times from the signal to the checkpoint and to the exit (None: killed after the checkpoint)."""
    log_start, done_before = len(job.text()), job.text().count(STOPPED)
    saved_before = len(job.records("checkpoint"))
    reached = job.records("train")[-1]["iter"]
    t_signal = time.time()
    if signal is not None:
        signal()
    else:  # the time limit: Slurm sends USR1, the job script logs it
        t_signal = job.wait_for(lambda: "USR1: time limit or preemption ahead" in job.text()[log_start:],
                                "the USR1 ahead of the time limit")
        reached = job.records("train")[-1]["iter"]

    def this_run() -> str:  # the log from the signal to the next run's start, if any
        return job.text()[log_start:].split("[megdet] slurm job:")[0]

    def stopped() -> bool:
        return job.text().count(STOPPED) > done_before

    def ended() -> bool:
        return "[megdet] slurm job:" in job.text()[log_start:] or job.state() not in ACTIVE

    def saved() -> list[dict]:
        return job.records("checkpoint")[saved_before:]

    # A stop slower than KillWait is SIGKILLed: the job then ends, or starts again, without a checkpoint.
    job.wait_for(lambda: saved(), "the checkpoint the stop writes", abort=lambda: (
        f"no checkpoint within KillWait={KILL_WAIT} s: the job ended or restarted" if ended() and not saved() else None))
    times = [r["time"] for r in job.records("train")][-6:]
    t_exit = job.wait_for(lambda: stopped() or ended(), "the ranks to exit")
    exited = stopped()
    text = this_run()
    assert len(saved()) == 1, saved()
    it = saved()[0]["iter"]
    # Every rank stopped at the same iteration, the one saved; at most the step in flight is lost.
    ranks = sorted(re.findall(r"rank (\d+): stopped on request after iteration (\d+)", text))
    if exited:
        assert ranks == [("0", str(it)), ("1", str(it))], text[-3000:]
    else:  # killed after the checkpoint: rank 0's line may not have reached the log
        assert ("1", str(it)) in ranks and set(ranks) <= {("0", str(it)), ("1", str(it))}, text[-3000:]
    assert it >= reached
    assert Path(saved()[0]["path"]).name == f"ckpt_{it:08d}.pt"
    assert "DataLoader worker" not in text, text[-3000:]
    step_s = sorted(b - a for a, b in zip(times, times[1:]))[len(times) // 2 - 1] if len(times) > 2 else None
    timing = {"iter": it, "to_checkpoint_s": round(saved()[0]["time"] - t_signal, 1),
              "to_exit_s": round(t_exit - t_signal, 1) if exited else None, "step_s": step_s and round(step_s, 1)}
    print(f"\n[timing] job {job.id}: {timing}")
    return timing


def _assert_resumed(job: Job, it: int) -> None:
    """The newest run of the trainer started from ckpt_<it> and trained step it + 1 next."""
    job.wait_for(lambda: len(job.runs()) >= 2 and any(r["type"] == "train" for r in job.runs()[-1]),
                 "the next run to train a step", abort=lambda: "the job ended" if job.state() not in ACTIVE else None)
    run = job.runs()[-1]
    assert run[0]["start_iter"] == it
    assert next(r["iter"] for r in run if r["type"] == "train") == it + 1
    assert f"resumed from {job.out / 'checkpoints' / f'ckpt_{it:08d}.pt'} at iteration {it}" in job.text()


def test_horovodrun_requeue_then_scancel_signal_term(slurm, submit):
    job = submit()  # LAUNCHER defaults to horovodrun
    job.wait_training()
    first = _stop(job, lambda: slurm.run("scontrol", "requeue", job.id))
    _assert_resumed(job, first["iter"])
    # (Slurm itself may have requeued the job once more, e.g. after a launch that timed out under load)
    assert int(slurm.job(job.id)["Restarts"]) >= 1

    # `scancel --signal=TERM` signals job steps only: the guard step passes it to the batch shell.
    reached = job.wait_training(after_iter=first["iter"])
    second = _stop(job, lambda: slurm.run("scancel", "--signal=TERM", job.id))
    assert second["iter"] >= reached
    job.wait_done()
    info = slurm.job(job.id)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "143:0")
    assert [r["State"] for r in slurm.sacct(job.id)][-1] == "FAILED"
    assert len(slurm.sacct(job.id)) >= 2  # the requeued run(s) and the last one
    assert "horovodrun -np 2 -H" in job.text()


def test_mpirun_time_limit_requeues_through_the_template_signal(slurm, submit):
    # --time=3 with USR1 60 s ahead: Slurm sends it 60-90 s into the run (its check runs every 30 s).
    job = submit("--time=3", "--signal=B:USR1@60", LAUNCHER="mpirun")
    job.wait_training()
    first = _stop(job, None)
    assert job.text().count("USR1: time limit or preemption ahead, requeueing job") == 1
    _assert_resumed(job, first["iter"])
    assert int(slurm.job(job.id)["Restarts"]) >= 1  # and Slurm's own requeues, if any
    assert "mpirun -np 2 -H" in job.text() and "mpirun has detected an attempt to run as root" not in job.text()
    # (the submit fixture ends the job)


def test_srun_scancel_signal_term_then_resubmit_resumes_and_finishes(slurm, submit, tmp_path):
    job = submit(LAUNCHER="srun")
    job.wait_training()
    stopped = _stop(job, lambda: slurm.run("scancel", "--signal=TERM", job.id))
    job.wait_done()
    assert (slurm.job(job.id)["JobState"], slurm.job(job.id)["ExitCode"]) == ("FAILED", "143:0")
    assert "srun --mpi=pmix --nodes=1 --ntasks=2" in job.text()

    # The same submission again (a few steps more) resumes from that checkpoint and finishes.
    total = stopped["iter"] + 3
    sets = tuple(s for s in TRAIN if not s.startswith("train.max_iters=")) + (f"train.max_iters={total}",)
    again = submit(sets=sets, LAUNCHER="srun")
    again.wait_done()
    assert slurm.sacct(again.id)[-1]["State"] == "COMPLETED", again.text()[-3000:]
    _assert_resumed(again, stopped["iter"])
    assert [r["iter"] for r in again.runs()[-1] if r["type"] == "train"] == list(range(stopped["iter"] + 1, total + 1))
    assert (again.out / "finished.json").is_file()
    # A batch log is read in a file: plain progress lines, no carriage-return bar.
    log = again.log.read_bytes()
    assert b"\r" not in log
    assert re.search(rb"INFO train %d/%d \(100%%\)" % (total, total), log), log[-3000:]

    # A third submission into the finished run stops at once, saying so in one line.
    third = submit(sets=sets, LAUNCHER="srun")
    third.wait_done()
    assert slurm.job(third.id)["JobState"] == "FAILED"
    errors = [line for line in third.text().splitlines() if "error" in line]
    assert len(errors) == 1 and "holds a finished run" in errors[0] and "EXTEND=1" in errors[0], third.text()
    assert "running:" not in third.text()


def test_ranks_per_node_must_match_what_slurm_granted(slurm, submit):
    job = submit("--ntasks-per-node=1", GPUS_PER_NODE="2")
    job.wait_done()
    assert slurm.job(job.id)["JobState"] == "FAILED"
    assert re.search(r"\[megdet\] error: 2 ranks per node but Slurm granted 1 tasks on \S+ \(SLURM_TASKS_PER_NODE=1\): "
                     r"submit with --ntasks-per-node=2", job.text()), job.text()
    assert "running:" not in job.text()


def test_a_missing_launcher_names_jobs_env_sh(slurm, submit):
    job = submit(MEGDET_VENV="")  # env.sh activates no venv, and none is on PATH
    job.wait_done()
    assert slurm.job(job.id)["JobState"] == "FAILED"
    errors = [line for line in job.text().splitlines() if line.startswith("[megdet] error")]
    assert len(errors) == 1 and "horovodrun ('horovodrun') is not on PATH" in errors[0] and "jobs/env.sh" in errors[0], job.text()
