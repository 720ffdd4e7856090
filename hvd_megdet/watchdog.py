"""A stalled rank ends the job: a thread per rank exits the process when training stops progressing.

    wd = Watchdog(ctx.rank, cfg.train.stall_timeout_s, status_dir=out / "status", world_size=ctx.size)
    with wd:                                   # starts the thread; stops it on leaving
        loader = watched(loader, wd)           # two beats per batch: waiting for it, training on it
        ...
        wd.beat("checkpoint write", timeout_s=...)   # any other long wait, with its own limit

If no beat comes for ``timeout_s`` seconds, the thread prints one line naming this rank, what it waits
on and which rank stalled, and ends the process with exit code 1 (``os._exit``: the main thread may
be blocked in native code). The launcher (mpirun, srun, horovodrun) then ends every other rank.

Why a watchdog of our own: Horovod's stall inspector cannot see a rank that stops (SIGSTOP, a read hung
in the kernel, a node swapping). Its coordinator gathers every rank's requests over MPI each cycle, so
it waits for the stopped rank inside MPI and never runs the check. Measured with Horovod 0.28.1, 2
ranks under mpirun, HOROVOD_STALL_CHECK_TIME_SECONDS=3 and HOROVOD_STALL_SHUTDOWN_TIME_SECONDS=6,
SIGSTOP of rank 1: no warning and no shutdown within 40 s, with or without the response cache.

Naming the stalled rank: every rank's thread rewrites ``status_dir/rank00001.json`` (time alive, beats,
what it waits on) each ``poll_s``. The directory must be visible to every rank; the output directory is,
since every rank reads its checkpoints from there. When a watchdog fires it reads every status. Ranks
whose status has not been rewritten lately are stopped or dead. Otherwise the ranks that fetched the
fewest batches are behind; every rank fetches the same number of batches, so a rank that is still
waiting for its DataLoader while the others sit in the allreduce is the one stalled.
"""
from __future__ import annotations

import faulthandler
import json
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from hvd_megdet.fileio import atomic_write_text

EXIT_CODE = 1


class Watchdog:
    """Ends this process when :meth:`beat` is not called for ``timeout_s`` seconds.

    Args:
        rank: this rank (named in the message and the status file).
        timeout_s: seconds without a beat before the process exits; 0 or less disables the watchdog.
        status_dir: where every rank writes its status (shared by all ranks); None: only this rank's
            own state is reported.
        world_size: ranks whose status files are read when naming the stalled one.
        poll_s: how often the thread checks and writes its status (default: timeout_s / 6, at most 30 s).
        dump_stacks: before exiting, print every thread's Python stack (``--debug``).
        setting: the configuration key of ``timeout_s``, named in the message.
    """

    def __init__(self, rank: int, timeout_s: float, status_dir: str | Path | None = None, *, world_size: int = 1,
                 poll_s: float | None = None, dump_stacks: bool = False,
                 setting: str = "train.stall_timeout_s") -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.status_dir = Path(status_dir) if status_dir is not None else None
        self.poll_s = poll_s if poll_s is not None else min(max(self.timeout_s / 6, 0.05), 30.0)
        self.dump_stacks, self.setting = dump_stacks, setting
        self.waiting_on, self.batches, self.beats = "start-up", 0, 0
        self._beat_at, self._limit = time.monotonic(), self.timeout_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> Watchdog:
        """Start checking (and, with a status directory, publishing this rank's status)."""
        if self.enabled and not self._threads:
            self.beat(self.waiting_on)
            self._stop.clear()
            # Two threads: the status file lives on a shared file system, which can hang; the check that
            # ends the process must not wait behind it.
            self._threads = [threading.Thread(target=self._check, name=f"watchdog-rank{self.rank}", daemon=True)]
            if self.status_dir is not None:
                self._threads.append(threading.Thread(target=self._publish, name="watchdog-status", daemon=True))
            for thread in self._threads:
                thread.start()
        return self

    def stop(self) -> None:
        """Stop checking (the process continues); the status file is left for the others to read."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.poll_s + 5)  # a writer stuck on a hung file system is left behind
        self._threads = []

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def beat(self, waiting_on: str, timeout_s: float | None = None, batch_fetched: bool = False) -> None:
        """Progress: from now on this rank waits on ``waiting_on``, for at most ``timeout_s`` (default:
        the watchdog's). ``batch_fetched`` counts one more batch received (see :func:`watched`)."""
        # Plain attribute writes: atomic under the GIL, and the thread reads them without a lock.
        self.batches += batch_fetched
        self.waiting_on, self._limit = waiting_on, self.timeout_s if timeout_s is None else float(timeout_s)
        self.beats += 1
        self._beat_at = time.monotonic()

    def status(self) -> dict[str, Any]:
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "alive_at": time.time(),
                "idle_s": time.monotonic() - self._beat_at, "batches": self.batches, "beats": self.beats,
                "waiting_on": self.waiting_on}

    def _check(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._beat_at
            if idle > self._limit:
                self._fire(idle)

    def _publish(self) -> None:
        while True:
            self._write_status()
            if self._stop.wait(self.poll_s):
                return

    def _status_path(self, rank: int) -> Path:
        assert self.status_dir is not None
        return self.status_dir / f"rank{rank:05d}.json"

    def _write_status(self) -> None:
        if self.status_dir is None:
            return
        try:
            atomic_write_text(self._status_path(self.rank), json.dumps(self.status()))
        except OSError:
            pass  # a full or failing disk must not end training: the status only serves the message

    def _read_statuses(self) -> dict[int, dict[str, Any] | None]:
        found: dict[int, dict[str, Any] | None] = {}
        for rank in range(self.world_size):
            try:
                found[rank] = json.loads(self._status_path(rank).read_text())
            except (OSError, ValueError):
                found[rank] = None
        return found

    def _fire(self, idle: float) -> None:
        statuses: dict[int, dict[str, Any] | None] = {}
        if self.status_dir is not None:  # read in a thread of its own: the file system may be what hangs
            reader = threading.Thread(target=lambda: statuses.update(self._read_statuses()), daemon=True)
            reader.start()
            reader.join(timeout=5.0)
            statuses = {rank: statuses.get(rank) for rank in range(self.world_size)}
        statuses[self.rank] = self.status()
        line = (f"error: rank {self.rank}: no progress for {idle:.0f} s (waiting on: {self.waiting_on}); "
                f"{diagnose(statuses, time.time(), stale_s=max(3 * self.poll_s, 2.0))}; "
                f"ending this rank ({self.setting}={self.timeout_s:g})\n")
        if self.dump_stacks:
            faulthandler.dump_traceback(all_threads=True)
        # os.write, not print: a main thread stuck inside a write may hold sys.stderr's lock.
        os.write(2, line.encode(errors="replace"))
        for child in multiprocessing.active_children():  # DataLoader workers: a hung one would outlive us
            child.kill()
        os._exit(EXIT_CODE)


def diagnose(statuses: dict[int, dict[str, Any] | None], now: float, stale_s: float) -> str:
    """Which ranks stalled, from every rank's last status (None: no status file), as a phrase.

    A rank whose status is older than ``stale_s`` seconds is stopped or dead (its watchdog thread no
    longer runs). If every rank is alive, those that fetched the fewest batches are behind the others.
    """
    if len(statuses) <= 1:
        return "no other rank to compare with"
    silent = {r: now - s["alive_at"] for r, s in statuses.items() if s is not None and now - s["alive_at"] > stale_s}
    missing = sorted(r for r, s in statuses.items() if s is None)
    parts = []
    if silent:
        parts.append("stalled: " + ", ".join(f"rank {r} on {statuses[r].get('host', '?')} (no sign of life for "
                                             f"{age:.0f} s: stopped, dead, or hung in the kernel; a lost host?)"
                                             for r, age in sorted(silent.items())))
    alive = {r: s for r, s in statuses.items() if s is not None and r not in silent}
    if not silent and alive:
        fewest = min(s["batches"] for s in alive.values())
        if fewest < max(s["batches"] for s in alive.values()):
            behind = sorted(r for r, s in alive.items() if s["batches"] == fewest)
            parts.append("stalled: " + ", ".join(f"rank {r} on {alive[r].get('host', '?')} (behind the others, "
                                                 f"waiting on: {alive[r]['waiting_on']})" for r in behind))
    if missing:
        parts.append(f"no status from rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                     f"(not started, or the status directory is not shared or readable)")
    if not parts:
        hosts = sorted({s.get("host", "?") for s in alive.values()})
        parts.append("every rank is alive at the same batch (a collective some ranks never joined? "
                     "Horovod's stall warning lists the ranks missing from it"
                     + (f"; or the network between hosts {', '.join(hosts)} is cut)" if len(hosts) > 1 else ")"))
    return "; ".join(parts)


class WatchedLoader:
    """A DataLoader whose iteration beats the watchdog: before waiting for each batch and once it
    has arrived. Other attributes (``batch_sampler``, ``len``) are the loader's."""

    def __init__(self, loader: Any, watchdog: Watchdog) -> None:
        self.loader, self.watchdog = loader, watchdog

    def __iter__(self) -> Iterator[Any]:
        wd = self.watchdog
        iterator = iter(self.loader)
        while True:
            wd.beat(f"batch {wd.batches + 1} of the run from the DataLoader workers")
            try:
                batch = next(iterator)
            except StopIteration:
                wd.beat("the work after an epoch's last batch (checkpoint, evaluation)")
                return
            wd.beat(f"the training step on batch {wd.batches + 1} of the run (forward, backward, allreduce)",
                    batch_fetched=True)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (copy, unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.loader, name)


def watched(loader: Any, watchdog: Watchdog) -> Any:
    """``loader``, beating ``watchdog`` around every batch (``loader`` itself when it is disabled)."""
    return WatchedLoader(loader, watchdog) if watchdog.enabled else loader
