"""A request to stop training: SIGTERM to a rank, or the file ``STOP`` in the output directory.

    with StopRequest(out, watch_file=ctx.is_main) as stop:
        for step in ...:
            if engine.any_rank(stop.requested(), ctx, "stop"):   # dist(world): all stop together
                ...save one checkpoint, then stop.record(...)

Two ways, because a stop must reach every rank on every node whatever launched them:
- SIGTERM reaches the ranks that a scheduler or launcher signals itself (Slurm's job steps, `srun`'s
  tasks, `mpirun` passing a TERM on, Ctrl-C through a launcher).
- The file reaches the others. A batch shell that gets a requeue's, a time limit's or `qdel`'s signal
  writes ``OUTPUT_DIR/STOP`` (jobs/lib/stop.sh); rank 0 looks for it before each step on the shared
  file system that holds the checkpoints. It needs no process tree and no launcher in between.

Either way one rank knowing is enough: the per-step allreduce tells every rank. The file is removed
once the stop has been honoured (a checkpoint written), so a rerun does not stop at once.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

STOP_FILE = "STOP"


class StopRequest:
    """Within the block, SIGTERM sets a flag instead of ending the process (the previous handler
    comes back afterwards); :meth:`requested` also looks for ``output_dir/STOP`` if ``watch_file``."""

    def __init__(self, output_dir: str | Path, watch_file: bool = True) -> None:
        self.path = Path(output_dir) / STOP_FILE
        self.watch_file = watch_file
        self.signalled = threading.Event()
        self._previous = None

    def __enter__(self) -> StopRequest:
        self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.signalled.set())
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def file_seen(self) -> bool:
        return self.watch_file and self.path.exists()

    def requested(self) -> bool:
        return self.signalled.is_set() or self.file_seen()

    def how(self) -> dict:
        """This rank's part in the stop, for the log: host, PID, signalled, file seen."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "signalled": self.signalled.is_set(),
                "file": self.file_seen()}

    def honoured(self) -> None:
        """The checkpoint is written: consume the file (a rerun must not stop at its first step)."""
        if self.watch_file:
            self.path.unlink(missing_ok=True)


def request_stop(output_dir: str | Path, why: str = "requested") -> Path:
    """Ask the ranks training into ``output_dir`` to save and stop (what the batch shell does)."""
    path = Path(output_dir) / STOP_FILE
    tmp = path.with_name(f".{STOP_FILE}.{os.getpid()}")
    tmp.write_text(why + "\n")
    os.replace(tmp, path)
    return path
