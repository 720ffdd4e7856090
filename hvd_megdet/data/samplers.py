"""Per-rank sampling: a deterministic shuffle per epoch, resumable, with aspect-ratio grouped batches.

The rank arithmetic is pure (:func:`epoch_order`, :func:`shard_indices`, :func:`group_batches`), so tests
check every rank of a world in one process. Every rank gets the same number of samples (the order is
padded by repetition, as ``torch.utils.data.DistributedSampler`` does) and so the same number of
batches: Horovod ranks must run the same number of steps.

Resuming mid-epoch: the order of epoch ``e`` is a function of (seed, e, rank, world), so a
checkpoint records only the epoch and how many batches the training loop consumed; the sampler
rebuilds the order and starts after them. The trainer does::

    batch_sampler = GroupedBatchSampler(DistributedShardSampler(ds, rank, size, seed), ds.aspect_ratios(), 2)
    batch_sampler.load_state_dict(ckpt["batch_sampler"])         # when resuming
    for epoch in range(start_epoch, epochs):
        batch_sampler.set_epoch(epoch)                           # keeps the resume point of its epoch
        for it, (images, targets) in enumerate(loader):
            ...
            ckpt["batch_sampler"] = batch_sampler.state_dict(consumed=it + 1)

``consumed`` counts batches taken from the DataLoader in the current pass; it matters because
DataLoader workers fetch batches ahead of the loop. Without it the state counts batches the sampler
has handed out, which is exact only with ``num_workers=0``.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

LANDSCAPE, PORTRAIT = 0, 1


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True,
                shard_sizes: Sequence[int] | None = None) -> list[int]:
    """The global order of one epoch, before it is split among ranks.

    Args:
        num_samples: dataset length.
        seed, epoch: the order is a function of these alone.
        shuffle: False gives 0..n-1.
        shard_sizes: if given, shuffle whole shards (then images inside each shard), so a contiguous
            block of the order touches few shards.
    """
    if not shuffle:
        return list(range(num_samples))
    rng = np.random.default_rng([seed, epoch])
    if shard_sizes is None:
        return rng.permutation(num_samples).tolist()
    if sum(shard_sizes) != num_samples:
        raise ValueError(f"shard sizes add up to {sum(shard_sizes)}, not {num_samples}")
    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    order: list[int] = []
    for k in rng.permutation(len(shard_sizes)):
        order += (starts[k] + rng.permutation(shard_sizes[k])).tolist()
    return order


def shard_indices(num_samples: int, rank: int, world_size: int, seed: int = 0, epoch: int = 0,
                  shuffle: bool = True, shard_sizes: Sequence[int] | None = None) -> list[int]:
    """The dataset indices ``rank`` visits in ``epoch``: a contiguous block of the padded epoch order.

    Every rank gets ``ceil(num_samples / world_size)`` indices; ranks are disjoint except for the
    padding, which repeats the start of the order. With ``shard_sizes`` the block is shuffled again
    (seeded by rank) so that consecutive samples mix the rank's few shards.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if num_samples < 1:
        raise ValueError("cannot sample from an empty dataset")
    order = epoch_order(num_samples, seed, epoch, shuffle, shard_sizes)
    per_rank = math.ceil(num_samples / world_size)
    padded = (order * math.ceil(per_rank * world_size / num_samples))[:per_rank * world_size]
    mine = padded[rank * per_rank:(rank + 1) * per_rank]
    if shuffle and shard_sizes is not None:
        mine = [mine[k] for k in np.random.default_rng([seed, epoch, rank + 1]).permutation(len(mine))]
    return mine


def aspect_groups(aspect_ratios: Sequence[float]) -> list[int]:
    """LANDSCAPE (width >= height) or PORTRAIT for each image."""
    return [LANDSCAPE if r >= 1.0 else PORTRAIT for r in aspect_ratios]


def group_batches(indices: Sequence[int], groups: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of one aspect group each, in the order they fill up.

    Always returns ``len(indices) // batch_size`` batches (so equal-length samplers give equal batch
    counts on every rank): when the part-filled buffers hold enough samples for one more batch, the
    fuller buffer is completed with other samples of its group from this pass.
    """
    buffers: dict[int, list[int]] = {LANDSCAPE: [], PORTRAIT: []}
    batches = []
    for i in indices:
        buffer = buffers[groups[i]]
        buffer.append(i)
        if len(buffer) == batch_size:
            batches.append(buffer.copy())
            buffer.clear()
    if len(batches) < len(indices) // batch_size:  # at most one batch short: each buffer < batch_size
        group = max(buffers, key=lambda g: (len(buffers[g]), -g))
        partial = buffers[group]
        in_partial = set(partial)
        others = [i for i in indices if groups[i] == group and i not in in_partial] or partial
        fill = (others * math.ceil(batch_size / len(others)))[:batch_size - len(partial)]
        batches.append(partial + fill)
    return batches


class DistributedShardSampler(Sampler[int]):
    """This rank's share of a dataset, reshuffled every epoch (see :func:`shard_indices`).

    Args:
        dataset: anything with ``len``; ``shard_shuffle`` also needs ``dataset.shard_sizes``.
        rank, size: this rank and the world size.
        seed: same on every rank.
        shuffle: False keeps dataset order (evaluation).
        shard_shuffle: shuffle at shard granularity, so each rank reads a few shards per epoch.
    """

    def __init__(self, dataset: Any, rank: int, size: int, seed: int = 0, shuffle: bool = True,
                 shard_shuffle: bool = False) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside a world of {size}")
        self.dataset_len, self.rank, self.size, self.seed = len(dataset), rank, size, seed
        self.shuffle = shuffle
        self.shard_sizes = list(dataset.shard_sizes) if shard_shuffle else None
        self.num_samples = math.ceil(self.dataset_len / size)
        self.epoch, self._resume_at, self._pass_start, self._handed_out = 0, 0, 0, 0

    def indices(self) -> list[int]:
        """This rank's whole order for the current epoch."""
        return shard_indices(self.dataset_len, self.rank, self.size, self.seed, self.epoch, self.shuffle,
                             self.shard_sizes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; a resume point loaded for this same epoch is kept."""
        if epoch != self.epoch:
            self.epoch, self._resume_at = epoch, 0

    def __iter__(self) -> Iterator[int]:
        # A generator: the resume point is used on the first next(), not by an iterator that is
        # created and dropped unused (DataLoader's multi-worker iterator calls iter() twice).
        start, self._resume_at = self._resume_at, 0
        self._pass_start = self._handed_out = start
        for i in self.indices()[start:]:
            self._handed_out += 1
            yield i

    def __len__(self) -> int:
        """Samples per epoch on every rank (a resumed pass yields fewer)."""
        return self.num_samples

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where this epoch stands.

        Args:
            consumed: samples the loop took in the current pass (default: samples handed out).
        """
        done = self._handed_out if consumed is None else self._pass_start + consumed
        return {"epoch": self.epoch, "consumed": done, "seed": self.seed, "size": self.size,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the first sample not consumed when ``state`` was taken."""
        for key in ("seed", "size", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: checkpoint has {key}={state[key]}, this run {getattr(self, key)}")
        self.epoch, self._resume_at = state["epoch"], state["consumed"]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images are all landscape or all portrait (less padding inside a batch).

    Deterministic given the sampler's order; ``len`` is ``len(sampler) // batch_size`` on every rank.

    Args:
        sampler: a :class:`DistributedShardSampler` (or any sampler; resuming needs a deterministic one).
        aspect_ratios: width / height of every dataset image (``dataset.aspect_ratios()``).
        batch_size: images per batch on this rank.
    """

    def __init__(self, sampler: Sampler[int], aspect_ratios: Sequence[float], batch_size: int) -> None:
        if batch_size < 1 or len(sampler) < batch_size:
            raise ValueError(f"batch_size {batch_size} needs 1 <= batch_size <= {len(sampler)} (samples per rank)")
        self.sampler, self.batch_size = sampler, batch_size
        self.groups = aspect_groups(aspect_ratios)
        self._resume_at, self._pass_start, self._handed_out = 0, 0, 0

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def set_epoch(self, epoch: int) -> None:
        """Forward to the sampler; a resume point loaded for this same epoch is kept."""
        if epoch != self.epoch:
            self._resume_at = 0
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def batches(self) -> list[list[int]]:
        """Every batch of the current epoch, from its start."""
        order = self.sampler.indices() if hasattr(self.sampler, "indices") else list(self.sampler)
        return group_batches(order, self.groups, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator, for the reason given in DistributedShardSampler.__iter__.
        start, self._resume_at = self._resume_at, 0
        self._pass_start = self._handed_out = start
        for batch in self.batches()[start:]:
            self._handed_out += 1
            yield batch

    def __len__(self) -> int:
        """Batches per epoch on every rank (a resumed pass yields fewer)."""
        return len(self.sampler) // self.batch_size

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where this epoch stands.

        Args:
            consumed: batches the training loop took from the DataLoader in the current pass
                (default: batches handed out, exact only without DataLoader workers).
        """
        done = self._handed_out if consumed is None else self._pass_start + consumed
        return {"epoch": self.epoch, "batches_consumed": done, "batch_size": self.batch_size,
                "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the first batch not consumed when ``state`` was taken."""
        for key, mine in (("batch_size", self.batch_size), ("num_batches", len(self))):
            if state[key] != mine:
                raise ValueError(f"cannot resume: checkpoint has {key}={state[key]}, this run {mine}")
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(state["epoch"])
        self._resume_at = state["batches_consumed"]
