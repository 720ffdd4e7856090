"""Who launched this process, how many ranks there are, and how N items split over them.

Pure and torch-free, so ``data_prep`` (mpi4py) and ``comm`` (Horovod) read the environment the same
way. Every launcher exports the world size and this process's rank under its own names:

    Open MPI (mpirun, horovodrun over MPI)   OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_RANK
    MPICH / Intel MPI (Hydra), Cray PMI      PMI_SIZE / PMI_RANK
    Slurm srun (any --mpi plugin, PMI/PMIx)  SLURM_NTASKS / SLURM_PROCID (only inside a job step)
    PMIx launchers without the above         PMIX_RANK, size from PMIX_SIZE / OMPI_UNIVERSE_SIZE
    horovodrun --gloo                        HOROVOD_SIZE / HOROVOD_RANK
    PBS (mpiexec of the MPI above)           the MPI's own variables; PBS itself exports no rank

A plain ``python`` process is a world of one.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Launch:
    """What the environment says about this process's place in the job."""

    launcher: str = "none"  # openmpi | mpich | slurm | pmix | horovodrun-gloo | none
    size: int = 1
    rank: int = 0

    @property
    def uses_mpi(self) -> bool:
        """True when the ranks can form an MPI world (everything but horovodrun's Gloo mode)."""
        return self.launcher in ("openmpi", "mpich", "slurm", "pmix")


# (launcher, size variable, rank variable), in the order they are tried: the MPI's own variables win
# over Slurm's (an mpirun inside an allocation sees both) and over Horovod's (horovodrun over MPI).
_LAUNCHERS = (
    ("openmpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("mpich", "PMI_SIZE", "PMI_RANK"),
    ("pmix", "PMIX_SIZE", "PMIX_RANK"),
    ("horovodrun-gloo", "HOROVOD_SIZE", "HOROVOD_RANK"),
)


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch:
    """The launcher, world size and rank that the environment of this process describes."""
    env = os.environ if environ is None else environ
    for name, size_var, rank_var in _LAUNCHERS:
        if size_var in env:
            return Launch(name, int(env[size_var]), int(env.get(rank_var, "0")))
    if "PMIX_RANK" in env:  # PMIx without a size variable of its own
        size = env.get("OMPI_UNIVERSE_SIZE") or env.get("SLURM_NTASKS") or "1"
        return Launch("pmix", int(size), int(env["PMIX_RANK"]))
    # srun exports SLURM_PROCID to every task of a job step; the batch script itself has
    # SLURM_NTASKS but no SLURM_STEP_ID, and is not a rank.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return Launch("slurm", int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))),
                      int(env["SLURM_PROCID"]))
    return Launch()


def split(num_items: int, rank: int, size: int) -> range:
    """This rank's contiguous share of ``range(num_items)``: disjoint, covering, in order, unpadded.

    The first ``num_items % size`` ranks take one item more, so shares differ by at most one and no
    item is repeated (padding would, e.g., score an image twice in COCOeval).

    >>> [list(split(10, r, 3)) for r in range(3)]
    [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"need 0 <= rank < size, got rank={rank}, size={size}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    base, extra = divmod(num_items, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def local_mpirun_command(np: int) -> list[str]:
    """``mpirun`` for ``np`` ranks on this machine (tests, benchmarks, the demo): oversubscribed cores,
    no binding, and allowed as root (containers)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("mpirun not found on PATH: run `make setup` (it installs OpenMPI)")
    cmd = [mpirun, "-np", str(np), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd
