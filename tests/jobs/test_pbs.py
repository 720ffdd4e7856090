"""jobs/pbs/megdet.pbs under a real OpenPBS on two hosts (tests/jobs/pbs_cluster.py): submitted with qsub by
an ordinary user from the repository root, in the CPU form jobs/README.md documents (2 hosts x 2 ranks),
read back through qstat -xf and the trainer's log.jsonl.

    mpirun      qrerun of the running job (-r y, as the template sets): every rank saves at one iteration
                before PBS's SIGKILL, the rerun resumes from exactly that checkpoint and finishes
    horovodrun  qdel of the running job, then the same submission again: it resumes and finishes; a
                third refuses the finished run
    array       qsub -J 0-1 over a CONFIG_LIST of two small configs: each index trains its own config

PBS sends qdel's and qrerun's SIGTERM to every process of the job on its first host (batch shell,
launcher, ranks) and SIGKILL kill_delay later (KILL_DELAY, set on the queue by the fixture); the ranks on
the second host learn of the stop through the allreduce, and end with Open MPI's daemons (PBS does not know
of them). The tests assert only two bounds: the checkpoint before kill_delay, and nothing of a stopped run
left 4 x kill_delay after the signal; they print what they measured (pytest -s shows it). Without a PBS,
two more check the launch logic behind a rerun and a stop under a stand-in PBS job.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.jobs._fakes import PBS, REPO_ROOT, FakeCluster, run_script
from tests.jobs._run_log import RunLog
from tests.jobs.pbs_cluster import KILL_DELAY

# The CPU form of the submission (jobs/README.md): 2 hosts, 2 ranks and 2 cores on each.
CPU_FORM = ("-l", "select=2:ncpus=2:mpiprocs=2", "-l", "place=scatter")
# Smoke-sized training, a log record per step and no periodic checkpoint; 8 iterations stay inside the
# first epoch (16 iterations at 4 ranks x 1 image of 64): a stop after the first logged step leaves time
# to resume and still finish quickly.
TRAIN = ("train.max_iters=8", "train.checkpoint_every=1000", "train.log_every=1", "train.progress=true",
         "data.num_workers=1")
HOSTS = ["node01", "node01", "node02", "node02"]
JOB_TIMEOUT = 600  # seconds for any one event of a job (start-up on a loaded 2-core machine included)


class Job(RunLog):
    """One submitted job (or array subjob): its id, output file and OUTPUT_DIR."""

    def __init__(self, pbs, job_id: str, log: Path, out: Path):
        self.pbs, self.id, self.log, self.out = pbs, job_id, log, out

    def info(self) -> dict:
        return self.pbs.job(self.id)

    def state(self) -> str:
        return self.info().get("job_state", "?")

    def text(self) -> str:
        """The job's output: the file -o names once PBS has copied it there, else the MoM's spool file."""
        if self.log.exists():
            return self.log.read_text(errors="replace")
        for host in self.pbs.cluster.hosts:
            spool = self.pbs.home(host) / "spool" / f"{self.id}.OU"
            if spool.exists():
                return spool.read_text(errors="replace")
        return ""

    def wait_for(self, predicate, what: str, timeout: float = JOB_TIMEOUT, abort=lambda: None) -> float:
        """Poll until ``predicate()``; returns the time it became true. ``abort()`` returning a message
        fails at once (what happened instead)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            failure = abort() or (f"timed out after {timeout:.0f} s" if time.monotonic() > deadline else None)
            if failure:
                raise AssertionError(f"job {self.id}: {failure} waiting for {what} (state {self.state()}); "
                                     f"output ends:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        return time.time()

    def wait_training(self) -> int:
        """Wait for the first step of the current run; returns the newest iteration logged."""
        self.wait_for(lambda: self.runs() and any(r["type"] == "train" for r in self.runs()[-1]),
                      "a training step", abort=lambda: "the job ended" if self.state() == "F" else None)
        return self.records("train")[-1]["iter"]

    def wait_done(self) -> dict:
        self.wait_for(lambda: self.state() == "F", "the job to end")
        return self.info()


@pytest.fixture
def submit(pbs, pbs_shards, request):
    """submit(*qsub_options, sets=TRAIN, out=None, **env) -> Job: qsub in the CPU form as the job user,
    from the repository root, in that user's login environment plus ``env`` (the template's #PBS -V passes
    it on; qsub passes no script arguments, so the overrides go in EXTRA_SETS)."""
    jobs: list[Job] = []
    prefix = re.sub(r"\W", "_", request.node.name)

    def _submit(*options: str, form=CPU_FORM, sets=TRAIN, out: Path | None = None, log_name: str = "job.log",
                **env: str) -> Job:
        work = pbs.workdir(f"{prefix}/job{len(jobs)}")
        out = out or work / "out"
        log = work / log_name
        full = {"CONFIG": "configs/smoke_cpu.yaml", "DATA_PATH": str(pbs_shards), "OUTPUT_DIR": str(out),
                "EXTRA_SETS": " ".join(sets), **env}
        job_id = pbs.client(["qsub", *form, "-o", str(log), *options, str(PBS.relative_to(REPO_ROOT))],
                            env=full, cwd=REPO_ROOT).stdout.strip()
        jobs.append(Job(pbs, job_id, log, out))
        return jobs[-1]

    yield _submit
    # A failed test must not leave a job holding the hosts.
    active = [job.id for job in jobs if job.state() not in ("F", "?")]
    if active:
        pbs.client(["qdel", "-W", "force", *active], user=None, check=False)
        for job in jobs:
            job.wait_for(lambda j=job: j.state() in ("F", "?"), "the job to end after qdel -W force", timeout=120)


def _stop(job: Job, signal) -> dict:
    """Run ``signal()`` on a training job and check what the trainer did: all 4 ranks, on both hosts,
    stopped at one iteration (at or after the one reached) and exactly that checkpoint was written, before
    PBS's SIGKILL (KILL_DELAY after its TERM). Returns the iteration and the seconds from the signal to
    the checkpoint and to the end of the run (the job leaving state R)."""
    stops_before, saved_before = len(job.records("stop")), len(job.records("checkpoint"))
    runs_before = len(job.runs())
    reached = job.records("train")[-1]["iter"]
    t_signal = time.time()
    signal()

    def lost() -> str | None:  # SIGKILLed before the checkpoint: the job ended or started again without it
        if len(job.records("stop")) > stops_before:
            return None
        if job.state() == "F" or len(job.runs()) > runs_before:
            return f"no checkpoint within kill_delay={KILL_DELAY} s: the job ended or ran again"
        return None

    job.wait_for(lambda: len(job.records("stop")) > stops_before, "the stop record", abort=lost)
    stop = job.records("stop")[-1]
    saved = job.records("checkpoint")[saved_before:]
    it = stop["iter"]
    assert [r["iter"] for r in saved] == [it], saved
    assert Path(saved[0]["path"]) == job.out / "checkpoints" / f"ckpt_{it:08d}.pt"
    assert it >= reached
    # Every rank took part: 2 on each host, at least one of them told (signalled or the STOP file).
    assert sorted(r["host"] for r in stop["ranks"]) == HOSTS, stop
    assert any(r["signalled"] or r["file"] for r in stop["ranks"]), stop
    to_checkpoint = saved[0]["time"] - t_signal
    assert to_checkpoint < KILL_DELAY, f"checkpoint {to_checkpoint:.1f} s after the signal: PBS's SIGKILL came first"
    t_end = job.wait_for(lambda: job.state() != "R" or len(job.runs()) > runs_before, "the run to end")
    timing = {"iter": it, "to_checkpoint_s": round(to_checkpoint, 1), "to_run_end_s": round(t_end - t_signal, 1)}
    print(f"\n[timing] job {job.id}: {timing}")
    return {**timing, "t_signal": t_signal, "pids": [r["pid"] for r in stop["ranks"]]}


def _training(pid: int) -> bool:
    """``pid`` is a live (not zombie) trainer process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"hvd_megdet.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def _assert_stopped_ranks_gone(job: Job, stopped: dict) -> None:
    """Nothing of the stopped run lingers. PBS kills what it knows of (the first host); the ranks on the
    second host, which Open MPI started over ssh, end with its daemons, about 2 x kill_delay after the
    TERM with the grace jobs/lib/launch.sh gives them under PBS (8 minutes with the default 120 s)."""
    deadline = stopped["t_signal"] + 4 * KILL_DELAY
    while any(_training(pid) for pid in stopped["pids"]) and time.time() < deadline:
        time.sleep(0.5)
    left = [pid for pid in stopped["pids"] if _training(pid)]
    assert not left, f"job {job.id}: ranks {left} of the stopped run still run {4 * KILL_DELAY} s after the signal"
    print(f"[timing] job {job.id}: no rank of the stopped run left {time.time() - stopped['t_signal']:.0f} s "
          f"after the signal")


def _assert_resumed(job: Job, it: int, total: int) -> None:
    """The newest run of the trainer started from ckpt_<it> and trained it + 1 ... total."""
    run = job.runs()[-1]
    assert run[0]["start_iter"] == it
    assert [r["iter"] for r in run if r["type"] == "train"] == list(range(it + 1, total + 1))
    assert f"resumed from {job.out / 'checkpoints' / f'ckpt_{it:08d}.pt'} at iteration {it}" in job.text()


def _qrerun(pbs, job) -> None:
    """qrerun (root, a manager, only). Its client may give up waiting for the server's answer while the
    MoM still kills the job (kill_delay): "Response timed out. Job rerun request still in progress"."""
    proc = pbs.client(["qrerun", job.id], user=None, check=False)
    assert proc.returncode == 0 or "rerun request still in progress" in proc.stderr, proc.stderr


def test_mpirun_qrerun_saves_on_every_rank_and_the_rerun_resumes_and_finishes(pbs, submit):
    job = submit(LAUNCHER="mpirun")
    job.wait_training()
    stopped = _stop(job, lambda: _qrerun(pbs, job))
    info = job.wait_done()
    assert (info["run_count"], info["Exit_status"]) == (2, 0), job.text()[-3000:]
    _assert_resumed(job, stopped["iter"], 8)
    assert (job.out / "finished.json").is_file()
    assert (job.out / "pbs_job_id").read_text().strip() == job.id  # how a rerun knows it is one
    text = job.text()
    assert re.search(r"mpirun -np 4 -H node0[12]:2,node0[12]:2 ", text), text[-3000:]
    assert text.count("[megdet] pbs job: 2 node(s) x ranks [2 2] = 4 ranks") == 2  # both runs, in one file
    assert "done: 8 iterations" in text
    _assert_stopped_ranks_gone(job, stopped)


def test_horovodrun_qdel_then_resubmission_resumes_and_finishes(pbs, submit):
    job = submit()  # LAUNCHER defaults to horovodrun
    job.wait_training()
    stopped = _stop(job, lambda: pbs.client(["qdel", job.id]))  # as the user who submitted it
    info = job.wait_done()
    assert info["run_count"] == 1 and info["Exit_status"] != 0
    assert "horovodrun -np 4 -H node0" in job.text()

    # The same submission again resumes from that checkpoint and finishes.
    again = submit(out=job.out)
    info = again.wait_done()
    assert info["Exit_status"] == 0, again.text()[-3000:]
    _assert_resumed(again, stopped["iter"], 8)
    assert (again.out / "finished.json").is_file()
    assert not re.search(r"\r", again.text())  # a batch log: plain progress lines, no carriage-return bar
    assert re.search(r"INFO train 8/8 \(100%\)", again.text()), again.text()[-3000:]
    _assert_stopped_ranks_gone(job, stopped)

    # A third submission into the finished run stops at once, saying so in one line.
    third = submit(out=job.out)
    info = third.wait_done()
    assert info["Exit_status"] == 1
    errors = [line for line in third.text().splitlines() if "error" in line]
    assert len(errors) == 1 and "holds a finished run" in errors[0] and "EXTEND=1" in errors[0], third.text()
    assert "running:" not in third.text()


def test_array_job_trains_the_config_of_its_index(pbs, submit):
    configs = pbs.workdir("array_configs")
    smoke = yaml.safe_load((REPO_ROOT / "configs" / "smoke_cpu.yaml").read_text())
    for name, iters in (("array_a", 1), ("array_b", 2)):
        smoke["train"]["max_iters"] = iters
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(smoke))
    (configs / "list.txt").write_text("# one config per array index\narray_a.yaml\narray_b.yaml\n")
    outputs = pbs.workdir("array_outputs")
    # One host per index (both run at once), 2 ranks each; the output file of index i is job.<i>.log.
    # No OUTPUT_DIR: each index writes to OUTPUT_ROOT/<its config's name>. No HOROVOD_ARGS: horovodrun
    # refuses --network-interface when every host is the local one ("No interface is found for address
    # 127.0.0.1").
    job = submit("-J", "0-1", form=("-l", "select=1:ncpus=2:mpiprocs=2"), log_name="job.^array_index^.log",
                 sets=("train.log_every=1", "data.num_workers=0"), CONFIG_LIST=str(configs / "list.txt"),
                 CONFIG_DIR=str(configs), OUTPUT_ROOT=str(outputs), OUTPUT_DIR="", HOROVOD_ARGS="")
    assert job.id.endswith("[]." + pbs.head), job.id
    for index, (name, iters) in enumerate((("array_a", 1), ("array_b", 2))):
        sub = Job(pbs, job.id.replace("[]", f"[{index}]"), job.log.parent / f"job.{index}.log", outputs / name)
        info = sub.wait_done()
        assert info["Exit_status"] == 0, sub.text()[-3000:]
        assert f"array task {index} -> {configs / name}.yaml" in sub.text()
        assert json.loads((sub.out / "finished.json").read_text())["iterations"] == iters
        assert [r["iter"] for r in sub.records("train")] == list(range(1, iters + 1))
    assert sorted(p.name for p in outputs.iterdir()) == ["array_a", "array_b"]


# --- Without a PBS: the launch logic a rerun and a stop rely on, under a stand-in PBS job -----------------
def _fake_pbs(tmp_path: Path) -> tuple[FakeCluster, dict[str, str]]:
    """A stand-in PBS job 17 on hosts a and b, 2 ranks each; its launcher records and exits 0."""
    fake = FakeCluster(tmp_path)
    return fake, fake.env(PBS_NODEFILE=str(fake.nodefile(["a", "a", "b", "b"])), PBS_JOBID="17.pbs",
                          PBS_QUEUE="workq", LAUNCHER="mpirun", MPIRUN=str(fake.launcher), FAKE_EXIT="0")


def test_a_rerun_pbs_job_ends_at_once_when_its_own_run_finished(tmp_path):
    fake, env = _fake_pbs(tmp_path)
    fake.output.mkdir()
    (fake.output / "finished.json").write_text("{}\n")
    (fake.output / "pbs_job_id").write_text("17.pbs\n")   # written by the first run of job 17
    proc = run_script(PBS, {**env, "MEGDET_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "finished in an earlier run of this job" in proc.stderr and proc.stdout == ""

    (fake.output / "pbs_job_id").write_text("16.pbs\n")   # another job's run: a new job must not reuse it
    proc = run_script(PBS, {**env, "MEGDET_DRY_RUN": "1"})
    assert proc.returncode == 1 and "holds a finished run" in proc.stderr, proc.stderr


def test_a_pbs_job_notes_its_id_and_gives_open_mpi_half_of_kill_delay(tmp_path):
    fake, env = _fake_pbs(tmp_path)
    (fake.bin / "qstat").write_text('#!/bin/sh\n[ "$1 $2" = "-Qf workq" ] && printf "Queue: workq\\n    kill_delay = 30\\n"\n')
    (fake.bin / "qstat").chmod(0o755)
    assert run_script(PBS, env).returncode == 0
    assert fake.launcher_env()["OMPI_MCA_odls_base_sigkill_timeout"] == "15"
    assert (fake.output / "pbs_job_id").read_text() == "17.pbs\n"
    (fake.bin / "qstat").unlink()  # no qstat: PBS's default kill_delay, 10 s
    assert run_script(PBS, env).returncode == 0
    assert fake.launcher_env()["OMPI_MCA_odls_base_sigkill_timeout"] == "5"
    assert run_script(PBS, {**env, "STOP_GRACE": "40"}).returncode == 0  # the user's setting wins
    assert fake.launcher_env()["OMPI_MCA_odls_base_sigkill_timeout"] == "40"
