"""Who does what when packing runs under ``mpirun -np N``: pure rank arithmetic and a thin mpi4py wrapper.

Packing is not training, so it talks to MPI directly (mpi4py) rather than through Horovod. A plain
``python`` process never imports MPI: it is a world of one whose collectives return their input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hvd_megdet.ranks import detect_launch


def shards_of_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards written by ``rank``: round robin, so the small last shard does not pile onto one rank."""
    return list(range(rank, num_shards, world_size))


@dataclass(frozen=True)
class World:
    """This process's place among the packing ranks, with the three collectives packing needs."""

    rank: int = 0
    size: int = 1
    comm: Any = field(default=None, compare=False)

    def allgather(self, obj: Any) -> list[Any]:
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        return [obj] if self.comm is None else self.comm.gather(obj, root=0)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()

    def abort(self, code: int) -> None:
        """End every rank: one that failed must not leave the others waiting in a collective."""
        if self.comm is not None:
            self.comm.Abort(code)


def get_world() -> World:
    """The MPI world if this process was started by an MPI launcher, else a world of one."""
    launch = detect_launch()
    if launch.size <= 1:
        return World()
    if not launch.uses_mpi:
        raise SystemExit(f"error: started as rank {launch.rank} of {launch.size} by {launch.launcher}, "
                         f"but packing needs MPI ranks: launch with mpirun/srun, or run one process")
    try:
        from mpi4py import MPI
    except ImportError:
        # Running as a world of one on every rank would have all of them write the same shards.
        raise SystemExit(f"error: started as rank {launch.rank} of {launch.size} by {launch.launcher}, "
                         f"but mpi4py is not importable: run `make setup`") from None

    comm = MPI.COMM_WORLD
    return World(rank=comm.Get_rank(), size=comm.Get_size(), comm=comm if comm.Get_size() > 1 else None)
