"""Who does what when packing runs under ``mpirun -np N``: pure rank arithmetic and a thin mpi4py wrapper.

Packing is not training, so it talks to MPI directly (mpi4py) rather than through Horovod. A plain
``python`` process never imports MPI: it is a world of one whose collectives return their input.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

# Set by mpirun/mpiexec (Open MPI, MPICH / Intel MPI, PMIx launchers such as srun --mpi=pmix).
_LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def block_range(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous block [start, stop) of ``num_items`` that ``rank`` handles; sizes differ by <= 1."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


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
    if not any(name in os.environ for name in _LAUNCHER_ENV):
        return World()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return World(rank=comm.Get_rank(), size=comm.Get_size(), comm=comm if comm.Get_size() > 1 else None)
