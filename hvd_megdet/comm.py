"""The distributed state: the one module that imports Horovod.

MegDet (arXiv 1711.07240, Sec. 3.3) takes BN statistics over the GPUs of one machine. Here the ranks
are grouped by hostname (gathered with mpi4py before Horovod starts), each group becomes a Horovod
process set registered at ``hvd.init``, and CGBN reduces over the set that holds this rank.

Everything else receives a :class:`DistContext` explicitly and calls the collectives below. Without a
launcher (a plain ``python`` process) ``init`` still works: Horovod runs as a world of one, or, if
Horovod is not installed, every collective here is the identity.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from hvd_megdet.ranks import detect_launch

try:  # Optional so that data preparation and single-process tools run without Horovod.
    import horovod.torch as hvd
except ImportError:  # pragma: no cover - exercised only on machines without Horovod
    hvd = None

RANKS_PER_HOST_ENV = "HVD_MEGDET_RANKS_PER_HOST"

# Horovod settings this package ships, applied by :func:`init` before ``hvd.init`` to every key the
# user has not set in the environment. Each entry says why and what it measured (docs/design.md).
HOROVOD_DEFAULTS: dict[str, str] = {
    # ms between the background thread's cycles (Horovod: 1). Each CGBN collective is synchronous and
    # waits for a cycle: 2 ranks measured ~0.32 ms per collective at 0.1 against ~1.10 ms at 1, i.e.
    # ~35 instead of ~120 ms per ResNet-50 step (benchmarks/bench_collectives.py). Below 0.1 it no
    # longer falls (~0.3 ms floor), and 0 makes the thread spin: 4 ms on 2 idle cores, 22 on busy ones.
    "HOROVOD_CYCLE_TIME": "0.1",
}
# Applied only where a GPU computes: there the host cores are idle and the cycle's latency is what
# CGBN pays. On CPU ranks that fill every core the thread's tenfold wake-ups take CPU from training
# instead: bench_cgbn on 2 CPU ranks measured every mode slower at 0.1 than at 1 (CGBN/local 1.10-1.15x
# against 1.07x), so CPU runs keep Horovod's own settings.


def apply_horovod_defaults(environ: dict | None = None, gpu: bool | None = None) -> dict[str, str]:
    """Set each :data:`HOROVOD_DEFAULTS` key the user left unset, on a GPU machine only (``gpu``:
    default ``torch.cuda.is_available()``); returns the keys it set."""
    environ = os.environ if environ is None else environ
    if not (torch.cuda.is_available() if gpu is None else gpu):
        return {}
    applied = {k: v for k, v in HOROVOD_DEFAULTS.items() if k not in environ}
    environ.update(applied)
    return applied


@dataclass(frozen=True)
class DistContext:
    """Where this process sits. Built once by :func:`init`, then passed to whoever needs it.

    Attributes:
        rank, size: position in, and size of, the whole job.
        host_rank, host_size: position in, and size of, this rank's host group (a simulated host
            under HVD_MEGDET_RANKS_PER_HOST, so not a GPU index: see ``device_index``).
        device_index: the GPU this rank drives: its rank among the processes of its physical machine.
        host_index, num_hosts: which host group (in order of first rank), and how many there are.
        bn_ranks: the global ranks whose images share BN statistics with this rank (CGBN group).
        bn_process_set: the Horovod process set of ``bn_ranks``; None when the group is this rank
            alone or Horovod is not running (CGBN then communicates nothing).
        bn_groups, hostnames: every CGBN group (rank lists, in order) and every rank's hostname, so
            that rank 0 can log each group's size (hosts with unequal ranks have unequal BN sizes).
        horovod: True when Horovod was initialised (collectives really communicate).
    """

    rank: int = 0
    size: int = 1
    host_rank: int = 0
    host_size: int = 1
    device_index: int = 0
    host_index: int = 0
    num_hosts: int = 1
    bn_ranks: tuple[int, ...] = (0,)
    bn_process_set: Any = field(default=None, compare=False)
    horovod: bool = False
    bn_groups: tuple[tuple[int, ...], ...] = ((0,),)
    hostnames: tuple[str, ...] = ("",)

    @property
    def is_main(self) -> bool:
        """True on the rank that logs, writes checkpoints and scores evaluations."""
        return self.rank == 0


# ---------------------------------------------------------------------------------------------------
# Grouping (pure)
# ---------------------------------------------------------------------------------------------------
def host_groups(hostnames: Sequence[str], group_size: int | None = None) -> list[list[int]]:
    """Group ranks by hostname, in rank order, optionally splitting each host into fixed-size groups.

    Args:
        hostnames: the hostname of every rank, indexed by rank.
        group_size: if given, each host's ranks are cut into consecutive groups of this many ranks.

    Returns:
        Groups of global ranks, ordered by their first rank; identical on every rank given the same
        ``hostnames``, which Horovod requires of process sets.

    >>> host_groups(["a", "a", "b", "b"])
    [[0, 1], [2, 3]]
    >>> host_groups(["a"] * 4, group_size=2)
    [[0, 1], [2, 3]]
    """
    if group_size is not None and group_size < 1:
        raise ValueError(f"bn_group_size must be >= 1, got {group_size}")
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hostnames):
        by_host.setdefault(host, []).append(rank)
    groups: list[list[int]] = []
    for host, ranks in by_host.items():
        if group_size is None:
            groups.append(ranks)
            continue
        if len(ranks) % group_size:
            raise ValueError(
                f"bn_group_size={group_size} does not divide the {len(ranks)} ranks on host "
                f"{host!r} (ranks {ranks}); choose a divisor of the ranks per host"
            )
        groups.extend(ranks[i:i + group_size] for i in range(0, len(ranks), group_size))
    return sorted(groups, key=lambda g: g[0])


def simulated_hostnames(hostnames: Sequence[str], ranks_per_host: int | None) -> list[str]:
    """With ``ranks_per_host=k``, consecutive blocks of k ranks count as separate hosts (for tests)."""
    if not ranks_per_host:
        return list(hostnames)
    return [f"{host}#{rank // ranks_per_host}" for rank, host in enumerate(hostnames)]


def _context_from_groups(rank: int, hostnames: Sequence[str], bn_groups: list[list[int]],
                         process_sets: dict[tuple[int, ...], Any], horovod: bool,
                         device_index: int = 0) -> DistContext:
    host_ranks = host_groups(hostnames)
    host_index = next(i for i, g in enumerate(host_ranks) if rank in g)
    bn_ranks = tuple(next(g for g in bn_groups if rank in g))
    return DistContext(
        rank=rank, size=len(hostnames),
        host_rank=host_ranks[host_index].index(rank), host_size=len(host_ranks[host_index]),
        device_index=device_index, host_index=host_index, num_hosts=len(host_ranks),
        bn_ranks=bn_ranks, bn_process_set=process_sets.get(bn_ranks), horovod=horovod,
        bn_groups=tuple(tuple(g) for g in bn_groups), hostnames=tuple(hostnames),
    )


# ---------------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------------
def init(bn_group_size: int | None = None) -> DistContext:
    """Start Horovod with one process set per BN group and describe this rank.

    Under an MPI launcher (mpirun, srun --mpi=pmix, horovodrun without --gloo) hostnames are gathered
    with mpi4py and the sets registered at ``hvd.init(comm=..., process_sets=...)``. Under
    ``horovodrun --gloo`` there is no MPI, so hostnames go through Horovod itself and the sets are
    added afterwards as dynamic process sets. Every rank registers the same sets in the same order.

    Args:
        bn_group_size: ranks per CGBN group; None takes every rank of the host (the paper's choice).
    """
    ranks_per_host = int(os.environ.get(RANKS_PER_HOST_ENV, "0")) or None
    apply_horovod_defaults()  # Horovod reads its settings from the environment at hvd.init
    launch = detect_launch()
    if hvd is None:
        if launch.size > 1:
            # A world of one on every rank would train N copies into the same output directory.
            raise RuntimeError(f"started as rank {launch.rank} of {launch.size} by {launch.launcher}, but "
                               f"horovod is not importable: run `make setup` (or source jobs/env.sh)")
        return DistContext()

    if launch.launcher != "horovodrun-gloo":
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError(f"started as rank {launch.rank} of {launch.size} by {launch.launcher}, but "
                               f"mpi4py is not importable: run `make setup`") from None

        comm = MPI.COMM_WORLD
        # dist(world, mpi4py): every rank learns every rank's host before Horovod starts.
        hostnames = simulated_hostnames(comm.allgather(socket.gethostname()), ranks_per_host)
        bn_groups = host_groups(hostnames, bn_group_size)
        sets = _process_sets_for(bn_groups, comm.size)
        # dist(world): Horovod on MPI_COMM_WORLD, with the BN sets registered identically everywhere.
        hvd.init(comm=comm, process_sets=list(sets.values()))
    else:
        os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"  # must precede hvd.init
        hvd.init()
        # dist(world, gloo): hostnames through Horovod, since there is no MPI communicator.
        hostnames = simulated_hostnames(hvd.allgather_object(socket.gethostname(), name="hostnames"),
                                        ranks_per_host)
        bn_groups = host_groups(hostnames, bn_group_size)
        sets = {ranks: hvd.add_process_set(ps) for ranks, ps in
                _process_sets_for(bn_groups, hvd.size()).items()}
    if len(bn_groups) == 1 and hvd.size() > 1:
        sets[tuple(bn_groups[0])] = hvd.global_process_set  # one group of everyone: the global set
    return _context_from_groups(hvd.rank(), hostnames, bn_groups, sets, horovod=True,
                                device_index=hvd.local_rank())


def _process_sets_for(bn_groups: list[list[int]], size: int) -> dict[tuple[int, ...], Any]:
    # Groups of one rank need no communication, and Horovod already owns the set of all ranks.
    return {tuple(g): hvd.ProcessSet(g) for g in bn_groups if 1 < len(g) < size}


def shutdown(ctx: DistContext) -> None:
    if ctx.horovod:
        hvd.shutdown()


# ---------------------------------------------------------------------------------------------------
# Collectives. Each is the identity without Horovod or in a world of one.
# ---------------------------------------------------------------------------------------------------
def world_process_set(ctx: DistContext) -> Any:
    """Horovod's set of every rank (None without Horovod): for measuring a collective across hosts,
    which no CGBN group spans."""
    return hvd.global_process_set if ctx.horovod and ctx.size > 1 else None


def allreduce_sum_(tensor: torch.Tensor, process_set: Any, name: str | None = None) -> torch.Tensor:
    """In-place sum over ``process_set`` (None: no communication). Not differentiable."""
    if process_set is None:
        return tensor
    # dist(process set): summed over the given set only, e.g. one CGBN group.
    return hvd.allreduce_(tensor, op=hvd.Sum, process_set=process_set, name=name)


def allreduce_differentiable(tensor: torch.Tensor, process_set: Any, average: bool = False,
                             name: str | None = None) -> torch.Tensor:
    """Out-of-place, differentiable sum (or mean) over ``process_set``; its backward reduces too."""
    if process_set is None:
        return tensor
    # dist(process set): Horovod's backward allreduces the gradient over the same set.
    return hvd.allreduce(tensor, op=hvd.Average if average else hvd.Sum, process_set=process_set, name=name)


def allreduce_mean(tensor: torch.Tensor, ctx: DistContext, name: str | None = None) -> torch.Tensor:
    """Mean over all ranks (out of place)."""
    if not ctx.horovod or ctx.size == 1:
        return tensor
    # dist(world): averaged over every rank.
    return hvd.allreduce(tensor, op=hvd.Average, name=name)


def reduce_dict(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average a dict of scalars over all ranks in one collective (for logging)."""
    if not values or not ctx.horovod or ctx.size == 1:
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    # dist(world): one fused allreduce of every logged scalar.
    mean = hvd.allreduce(stacked, op=hvd.Average, name="reduce_dict")
    return dict(zip(keys, mean.tolist()))


# Horovod names an object collective after type(obj).__name__ unless told otherwise, so ranks passing
# objects of different types (a path on rank 0, None elsewhere) would wait on differently named
# collectives forever. Every object collective here carries a fixed name.
def allgather_object(obj: Any, ctx: DistContext, name: str = "allgather_object") -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.horovod or ctx.size == 1:
        return [obj]
    # dist(world): pickled objects gathered to every rank.
    return hvd.allgather_object(obj, name=name)


def broadcast_object(obj: Any, ctx: DistContext, root: int = 0, name: str = "broadcast_object") -> Any:
    """Rank ``root``'s ``obj`` on every rank."""
    if not ctx.horovod or ctx.size == 1:
        return obj
    # dist(world): one rank decides (e.g. which checkpoint to resume), everyone follows.
    return hvd.broadcast_object(obj, root_rank=root, name=name)


def barrier(ctx: DistContext) -> None:
    if ctx.horovod and ctx.size > 1:
        hvd.barrier()  # dist(world)


def broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    ctx: DistContext, root: int = 0) -> None:
    """Make every rank start from rank ``root``'s weights, buffers and optimizer state."""
    if not ctx.horovod or ctx.size == 1:
        return
    # dist(world): parameters and buffers (BN running stats included) from the root rank.
    hvd.broadcast_parameters(model.state_dict(), root_rank=root)
    # An empty optimizer state is identical everywhere already. Horovod would fill it with a dummy
    # zero-gradient step, which applies weight decay to the weights just broadcast and seeds the
    # momentum with it, so broadcast only a state that exists (after a resume, on every rank).
    if optimizer is not None and optimizer.state_dict()["state"]:
        # dist(world): momentum buffers and per-group settings (lr) from the root rank.
        hvd.broadcast_optimizer_state(optimizer, root_rank=root)


def distributed_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, ctx: DistContext,
                          *, fp16_compression: bool = False,
                          backward_passes_per_step: int = 1) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` applies gradients averaged over all ranks.

    Without Horovod the optimizer is returned as is (a world of one needs no averaging).
    """
    if not ctx.horovod:
        return optimizer
    # dist(world): gradients are averaged across every rank by allreduce hooks during backward;
    # fp16 compression halves the bytes on the wire. With backward_passes_per_step=k the k local
    # gradients are summed before the allreduce: the trainer divides each pass's loss by k.
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if fp16_compression else hvd.Compression.none,
        backward_passes_per_step=backward_passes_per_step,
        op=hvd.Average,
    )


def optimizer_skip_synchronize(optimizer: torch.optim.Optimizer):
    """Context for ``step()`` after an explicit ``optimizer.synchronize()`` (gradient clipping)."""
    import contextlib

    return optimizer.skip_synchronize() if hasattr(optimizer, "skip_synchronize") else contextlib.nullcontext()


def discard_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Drop the gradients accumulated in this step (a skipped step), so the next step starts clean.

    Call only before the step's last backward pass, on every rank alike (no allreduce in flight).
    """
    if hasattr(optimizer, "set_backward_passes_per_step"):
        # Horovod counts each parameter's backward passes down to the one that starts its allreduce
        # and keeps a (None) handle for every earlier pass: zero_grad() refuses while any is held, and
        # a step skipped without resetting the counts would reduce after too few passes next time.
        optimizer._handles.clear()
        optimizer.set_backward_passes_per_step(optimizer.backward_passes_per_step)
    optimizer.zero_grad()


def synchronize_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Wait for the averaged gradients (needed before clipping them)."""
    if hasattr(optimizer, "synchronize"):
        optimizer.synchronize()  # dist(world): finish the gradient allreduces now


