"""Run a test function on N real MPI ranks from pytest.

    results = run_ranks("tests.test_comm:_allreduce_worker", np=4, ranks_per_host=2)

Each rank imports ``module:function`` and calls it with the given arguments; the return value (any
picklable object) comes back in rank order. A rank that raises writes its traceback and aborts the MPI
job, so the test fails with every failing rank's traceback instead of hanging; a job that outlives
``timeout`` is killed (its whole process group) and the test fails with the ranks that never reported.
Nothing here mocks Horovod or MPI: ranks are processes started by ``mpirun --oversubscribe``.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hvd_megdet.ranks import local_mpirun_command

REPO_ROOT = Path(__file__).resolve().parent.parent


class RankFailure(AssertionError):
    """One or more ranks failed, or the job hung past its timeout."""


def mpirun_command(np: int) -> list[str]:
    """The mpirun prefix for ``np`` ranks sharing this machine's cores."""
    try:
        return local_mpirun_command(np)
    except FileNotFoundError as err:  # a missing launcher fails the test; it is never a skip
        raise RankFailure(str(err)) from None


def run_ranks(
    target: str,
    np: int,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    env: dict[str, str] | None = None,
    ranks_per_host: int | None = None,
    timeout: float = 180.0,
) -> list[Any]:
    """Call ``target`` ("pkg.module:function") on ``np`` MPI ranks and return their results.

    Args:
        target: the worker function, importable from the repository root.
        np: number of ranks.
        args, kwargs: passed to the worker on every rank (must pickle).
        env: extra environment variables for every rank.
        ranks_per_host: sets HVD_MEGDET_RANKS_PER_HOST so consecutive blocks of ranks count as
            separate hosts (2 hosts x 2 ranks on one machine).
        timeout: seconds before the whole job is killed and the test fails.

    Returns:
        The worker's return value on each rank, in rank order.
    """
    with tempfile.TemporaryDirectory(prefix="hvd_megdet_ranks_") as tmp:
        out = Path(tmp)
        payload = out / "payload.pkl"
        payload.write_bytes(pickle.dumps((target, tuple(args), dict(kwargs or {}))))
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        # Several ranks on 2 cores: one intra-op thread each keeps them from starving each other.
        child_env.setdefault("OMP_NUM_THREADS", "1")
        if ranks_per_host is not None:
            child_env["HVD_MEGDET_RANKS_PER_HOST"] = str(ranks_per_host)
        child_env.update(env or {})
        cmd = mpirun_command(np) + [sys.executable, "-m", "tests._rank_main", str(payload), str(out)]
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # so a hang can be killed with all its ranks
        )
        try:
            log, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            timed_out = True
        log_text = log.decode(errors="replace")
        return _collect(out, np, proc.returncode, timed_out, timeout, log_text, target)


def _collect(out: Path, np: int, returncode: int, timed_out: bool, timeout: float, log: str,
             target: str) -> list[Any]:
    results, errors, missing = [], [], []
    for rank in range(np):
        err, res = out / f"rank{rank}.err", out / f"rank{rank}.pkl"
        if err.exists():
            errors.append(f"--- rank {rank} raised:\n{err.read_text()}")
        elif res.exists():
            results.append(pickle.loads(res.read_bytes()))
        else:
            missing.append(rank)
    if errors or missing or timed_out or returncode != 0:
        head = f"{target} on {np} ranks: "
        head += f"timed out after {timeout:.0f}s" if timed_out else f"mpirun exit code {returncode}"
        if missing:
            head += f"; ranks that never reported: {missing}"
        tail = log[-6000:]
        raise RankFailure("\n".join([head, *errors, "--- mpirun output (tail):", tail]))
    return results
