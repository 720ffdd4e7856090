"""Several hosts for real: ranks on node01 and node02 of the test cluster (tests/cluster.py), started by
horovodrun, horovodrun --gloo and mpirun with -H, grouped by their real hostnames (no
HVD_MEGDET_RANKS_PER_HOST anywhere).

- every rank's CGBN group is exactly the ranks of its host, and CGBN equals float64 BN over each host's
  images (tests/test_cgbn.py's reference), gradients are identical on every rank after a real step;
- hosts with unequal ranks (3 + 1) train, each host with its own BN size, which the log names;
- a checkpoint written by 2 hosts resumes bitwise under another launcher;
- a lost host (every process of node02 killed, or its link cut) ends every surviving rank within a
  bounded time with a line naming the host, and the next run resumes from the last whole checkpoint;
- a scheduler's TERM to every process of an mpirun job (requeue, scancel) ends every rank once it has
  saved, without waiting for mpirun and its daemons.
"""
from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hvd_megdet.checkpoint import load_checkpoint
from hvd_megdet.metrics import read_log
from tests.jobs._fakes import REPO_ROOT
from tests.test_cgbn import SHAPES, assert_matches_float64_bn

PYTHON = sys.executable
STALL_S = 20  # train.stall_timeout_s in the lost-host tests: the bound every surviving rank must meet


def launcher(kind: str, spec: str, np: int) -> list[str]:
    """The launcher line a user would type on node01 for ranks on ``spec`` ("node01:2,node02:2")."""
    if kind == "mpirun":
        # -x: mpirun copies only what it is told to the other hosts' ranks.
        return ["mpirun", "-np", str(np), "-H", spec, "--bind-to", "none", "--wdir", str(REPO_ROOT),
                "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "PATH"]
    gloo = ["--gloo"] if kind == "horovodrun-gloo" else []
    return ["horovodrun", "-np", str(np), "-H", spec, "--network-interface", "eth0", *gloo]


def rank_env(cluster) -> dict[str, str]:
    return {**cluster.env, **cluster.mpi_env(), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(PYTHON).parent}:{cluster.env['PATH']}"}


def run_on_hosts(cluster, kind: str, spec: str, np: int, tmp_path: Path) -> list[dict]:
    """tests/_hosts_rank.py on every rank; returns each rank's report, in rank order."""
    out = tmp_path / kind
    out.mkdir()
    proc = cluster.run("node01", launcher(kind, spec, np) + [PYTHON, "-m", "tests._hosts_rank", str(out)],
                       env=rank_env(cluster), cwd=REPO_ROOT, timeout=600, check=False)
    reports = sorted(out.glob("rank*.pkl"))
    assert proc.returncode == 0 and len(reports) == np, (proc.stdout + proc.stderr)[-4000:]
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(np)]


@pytest.mark.parametrize("kind", ["horovodrun", "horovodrun-gloo", "mpirun"])
def test_ranks_group_by_host_and_cgbn_equals_float64_bn_per_host(cluster, kind, tmp_path):
    ranks = run_on_hosts(cluster, kind, "node01:2,node02:2", 4, tmp_path)
    assert [r["host"] for r in ranks] == ["node01", "node01", "node02", "node02"]
    assert [r["bn_ranks"] for r in ranks] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert all(r["num_hosts"] == 2 for r in ranks)
    for case in SHAPES:  # outputs, input and weight gradients, running statistics
        assert_matches_float64_bn([r["cgbn"] for r in ranks], case, [[0, 1], [2, 3]])
    # One real step under DistributedOptimizer: identical gradients and weights everywhere, although
    # every rank saw other images (its loss differs).
    first = ranks[0]["step"]
    assert len({round(r["step"]["loss"], 6) for r in ranks}) == 4
    for r in ranks[1:]:
        assert r["step"]["grads"].keys() == first["grads"].keys() and len(first["grads"]) > 50
        for name, grad in first["grads"].items():
            assert torch.equal(r["step"]["grads"][name], grad), name
        for name, param in first["params"].items():
            assert torch.equal(r["step"]["params"][name], param), name


# ----------------------------------------------------------------------------------------------------
# Training runs on the hosts
# ----------------------------------------------------------------------------------------------------
def train_command(kind: str, spec: str, np: int, shards: Path, out: Path, *sets: str) -> list[str]:
    return launcher(kind, spec, np) + [PYTHON, "-m", "hvd_megdet.train", "--config", "configs/smoke_cpu.yaml",
                                       "--set", f"data.train_path={shards}", f"train.output_dir={out}", *sets]


def train(cluster, kind: str, spec: str, np: int, shards: Path, out: Path, *sets: str) -> str:
    proc = cluster.run("node01", train_command(kind, spec, np, shards, out, *sets), env=rank_env(cluster),
                       cwd=REPO_ROOT, timeout=600, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    return text


def test_unequal_hosts_train_each_with_its_own_bn_size(cluster, slurm_shards, tmp_path):
    ranks = run_on_hosts(cluster, "mpirun", "node01:3,node02:1", 4, tmp_path)
    assert [r["bn_ranks"] for r in ranks] == [(0, 1, 2)] * 3 + [(3,)]
    for case in SHAPES:
        assert_matches_float64_bn([r["cgbn"] for r in ranks], case, [[0, 1, 2], [3]])
    # Decided: such a job trains (refusing would strand every uneven allocation), and rank 0 says
    # once which host normalises over how many images.
    out = tmp_path / "run"
    text = train(cluster, "mpirun", "node01:3,node02:1", 4, slurm_shards, out, "train.max_iters=1")
    start = read_log(out / "log.jsonl", "start")[0]
    assert start["bn_groups"] == [{"host": "node01", "ranks": 3, "bn_size": 3},
                                  {"host": "node02", "ranks": 1, "bn_size": 1}]
    warnings = [line for line in text.splitlines() if "BN size differs between hosts" in line]
    assert len(warnings) == 1 and "node01 3 ranks (BN size 3), node02 1 rank (BN size 1)" in warnings[0], text


def test_checkpoint_from_two_hosts_resumes_bitwise_under_another_launcher(cluster, slurm_shards, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    sets = ("train.max_iters=4", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    train(cluster, "mpirun", "node01:2,node02:2", 4, slurm_shards, whole, *sets)
    # The same 4 iterations in two runs: mpirun's checkpoint at 2 resumed by horovodrun.
    proc = cluster.run("node01", launcher("horovodrun", "node01:2,node02:2", 4) + [
        PYTHON, "-m", "hvd_megdet.train", "--config", "configs/smoke_cpu.yaml", "--resume",
        str(whole / "checkpoints" / "ckpt_00000002.pt"), "--set", f"data.train_path={slurm_shards}",
        f"train.output_dir={resumed}", *sets], env=rank_env(cluster), cwd=REPO_ROOT, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert read_log(resumed / "log.jsonl", "start")[0]["start_iter"] == 2
    a = load_checkpoint(whole / "checkpoints" / "ckpt_00000004.pt")
    b = load_checkpoint(resumed / "checkpoints" / "ckpt_00000004.pt")
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["progress"] == b["progress"]


# ----------------------------------------------------------------------------------------------------
# A lost host
# ----------------------------------------------------------------------------------------------------
def _wait(predicate, what: str, timeout: float = 300, proc=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launcher ended ({proc.returncode}) while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)
    return time.monotonic()


def _trainers(out: Path) -> list[int]:
    """PIDs of the trainer ranks of the run into ``out`` (not the launcher, whose arguments name it too)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"hvd_megdet.train"] and f"train.output_dir={out}".encode() in argv:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("fault", ["crash", "partition"])
def test_a_lost_host_ends_every_rank_in_bounded_time_and_the_next_run_resumes(cluster, slurm_shards, tmp_path,
                                                                              fault):
    out = tmp_path / "run"
    log = (tmp_path / "launcher.log").open("w")
    proc = cluster.popen("node01", train_command("mpirun", "node01:2,node02:2", 4, slurm_shards, out,
                                                 "train.max_iters=1000", "train.checkpoint_every=2",
                                                 f"train.stall_timeout_s={STALL_S}"),
                         env=rank_env(cluster), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: (out / "log.jsonl").exists() and read_log(out / "log.jsonl", "checkpoint"), "a checkpoint",
              proc=proc)
        survivors = [pid for pid in _trainers(out) if pid not in cluster.processes("node02")]
        assert len(survivors) == 2
        t_fault = time.monotonic()
        if fault == "crash":
            cluster.kill_host("node02")  # every process of the host at once: a crashed node
        else:
            cluster.partition("node02")  # the host and its ranks live on, unreachable
        t_gone = _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in survivors),
                       "the surviving ranks to exit", timeout=STALL_S * 6)
    finally:
        if fault == "crash":
            cluster.restart_host("node02")
        else:
            cluster.partition("node02", connected=True)
        for pid in _trainers(out):  # the cut-off host's ranks: their own watchdogs end them too
            _wait(lambda: not Path(f"/proc/{pid}").exists(), f"rank {pid} to exit", timeout=STALL_S * 6)
        if proc.poll() is None:  # mpirun waits on the lost host's daemon forever: the scheduler's job
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    text = (tmp_path / "launcher.log").read_text(errors="replace")
    seconds = t_gone - t_fault
    print(f"\n[lost host] {fault}: surviving ranks gone {seconds:.1f} s after the fault")
    # The bound the README states, by what ended the ranks (not by the clock): a crash closes the peer's
    # connections, so MPI ends them at once, before any stall watchdog fires; a partition closes nothing,
    # every rank waits in a collective, and the watchdog ends each after train.stall_timeout_s.
    if fault == "crash":
        assert re.search(r"^\s*Peer host:\s+node02$", text, re.M), text[-3000:]
        assert "no progress for" not in text, text[-3000:]
    else:
        lines = [ln for ln in text.splitlines() if "no progress for" in ln]
        assert lines and all(re.match(r"^error: rank \d: no progress for \d+ s .*; or the network between hosts "
                                      r"node01, node02 is cut\); ending this rank", ln) for ln in lines), text[-3000:]
    # Nothing half-written: only whole checkpoints, and the next run starts from the newest.
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts and all(re.fullmatch(r"ckpt_\d{8}\.pt", p.name) for p in ckpts), ckpts
    last = int(ckpts[-1].stem.split("_")[1])
    train(cluster, "mpirun", "node01:2,node02:2", 4, slurm_shards, out, f"train.max_iters={last + 1}",
          f"train.stall_timeout_s={STALL_S}")
    starts = read_log(out / "log.jsonl", "start")
    assert starts[-1]["start_iter"] == last and (out / "finished.json").exists()


# ----------------------------------------------------------------------------------------------------
# A scheduler's TERM to mpirun, its daemons and the ranks at once
# ----------------------------------------------------------------------------------------------------
def _live(pid: int) -> bool:
    """Running, not a zombie (mpirun asleep does not reap its ranks)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_term_to_every_process_of_an_mpirun_job_ends_every_rank_once_it_has_saved(cluster, slurm_shards, tmp_path):
    # What Slurm's requeue or scancel does to a 2-node mpirun job: TERM to every process of the batch
    # step (mpirun, its ranks on node01) and of the orted step on node02. mpirun and orted then sit in
    # Open MPI's kill delay (odls_base_sigkill_timeout: 120 s in the job scripts), their event loops
    # stopped. Ranks that finalized MPI after saving waited in MPI_Finalize's fence, which needs those
    # daemons, until the daemons woke and killed them; under horovodrun, whose mpirun Slurm loses track
    # of, they outlived the job by minutes. Every rank must end once its checkpoint is written.
    out = tmp_path / "run"
    log = (tmp_path / "launcher.log").open("w")
    proc = cluster.popen("node01", train_command("mpirun", "node01:2,node02:2", 4, slurm_shards, out,
                                                 "train.max_iters=1000", "train.checkpoint_every=1000"),
                         env={**rank_env(cluster), "OMPI_MCA_odls_base_sigkill_timeout": "600"}, cwd=REPO_ROOT,
                         stdout=log, stderr=subprocess.STDOUT)
    orted = []
    try:
        _wait(lambda: (out / "log.jsonl").exists() and read_log(out / "log.jsonl", "train"), "a step", proc=proc)
        ranks = _trainers(out)
        orted = [pid for pid in cluster.processes("node02") if Path(f"/proc/{pid}/comm").read_text().strip() == "orted"]
        assert len(ranks) == 4 and len(orted) == 1
        for pid in (proc.pid, *orted, *ranks):
            os.kill(pid, signal.SIGTERM)
        _wait(lambda: not any(_live(pid) for pid in ranks), "every rank to exit after saving", timeout=300)
        assert proc.poll() is None and _live(orted[0])  # both still in their delay: no rank waited for them
    finally:
        for pid in (proc.pid, *orted):
            if _live(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.close()
    (stop,) = read_log(out / "log.jsonl", "stop")
    assert [r["host"] for r in stop["ranks"]] == ["node01", "node01", "node02", "node02"]
    assert all(r["signalled"] for r in stop["ranks"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"ckpt_{stop['iter']:08d}.pt"]
