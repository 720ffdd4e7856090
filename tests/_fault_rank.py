"""One rank of a small training-shaped loop, for the fault tests (tests/test_faults.py) under mpirun.

    mpirun -np 2 python -m tests._fault_rank MODE STATUS_DIR [SPLIT_DIR]

Each step takes a batch from a DataLoader (one worker, persistent, beating the watchdog) and averages
it over all ranks, as a training step's gradient allreduce does. MODE:
    run          loop until killed (the test stops or kills a rank from outside)
    hang_worker  rank 1's DataLoader worker hangs forever at its 8th image
    bad_shard    read SPLIT_DIR's shards (the test damaged one)
    disk_full    rank 0 checkpoints into STATUS_DIR/run every 5 steps; from the second one on, the disk
                 is full (ENOSPC injected into the file's writes)
A UserError ends the rank the way the trainer's main() does: errors.end_rank ("error: rank R: <line>").
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from hvd_megdet import checkpoint, comm, errors, watchdog

STALL_TIMEOUT_S = float(os.environ.get("FAULT_STALL_TIMEOUT_S", "4"))


class Numbers(Dataset):
    """Image ``i`` is the number i; the worker of rank ``hang_rank`` never returns image ``hang_at``."""

    def __init__(self, status_dir: Path, rank: int, hang_rank: int | None = None, hang_at: int = 7) -> None:
        self.status_dir, self.rank, self.hang_rank, self.hang_at = status_dir, rank, hang_rank, hang_at

    def __len__(self) -> int:
        return 10**6

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.rank == self.hang_rank and i == self.hang_at:
            (self.status_dir / f"hung_worker_rank{self.rank}.pid").write_text(str(os.getpid()))
            while True:
                time.sleep(1)  # a read that never returns
        return torch.tensor([float(i)])


def _loader(mode: str, ctx: comm.DistContext, status_dir: Path, split: str | None) -> DataLoader:
    if mode == "bad_shard":
        from hvd_megdet.data import ShardedCocoDataset, build_transforms, collate_fn

        ds = ShardedCocoDataset(split, transforms=build_transforms(False, min_size=32, max_size=48))
        order = list(range(ctx.rank * len(ds) // ctx.size, (ctx.rank + 1) * len(ds) // ctx.size))  # contiguous
        return DataLoader(ds, batch_size=1, sampler=order, num_workers=1, persistent_workers=True,
                          collate_fn=collate_fn)
    ds = Numbers(status_dir, ctx.rank, hang_rank=1 if mode == "hang_worker" else None)
    return DataLoader(ds, batch_size=1, num_workers=1, persistent_workers=True)


def _fill_the_disk() -> None:
    """From now on every file write fails with ENOSPC, as on a full disk (after writing part of it)."""
    import builtins
    import errno

    real_open = builtins.open

    class _FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and "b" in mode else f

    builtins.open = full_open


def main() -> int:
    mode, status_dir = sys.argv[1], Path(sys.argv[2])
    split = sys.argv[3] if len(sys.argv) > 3 else None
    ctx = comm.init(None)
    wd = watchdog.Watchdog(ctx.rank, STALL_TIMEOUT_S, status_dir, world_size=ctx.size, poll_s=0.25)
    try:
        with wd:
            for step, _ in enumerate(watchdog.watched(_loader(mode, ctx, status_dir, split), wd), start=1):
                comm.allreduce_mean(torch.ones(1), ctx, name="step")  # dist(world): the step's allreduce
                if mode == "disk_full" and ctx.is_main and step % 5 == 0:
                    if step == 10:
                        _fill_the_disk()
                    checkpoint.save_checkpoint({"step": step, "w": torch.ones(1000)}, status_dir / "run", step, 3)
                time.sleep(0.02)
    except Exception as err:  # noqa: BLE001 - as the trainer's main(): one line for a UserError
        errors.end_rank(err, ctx.rank)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
