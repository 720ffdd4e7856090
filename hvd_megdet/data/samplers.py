"""Per-rank sampling: a deterministic shuffle per epoch, resumable, with aspect-ratio grouped batches.

The rank arithmetic is pure (:func:`epoch_order`, :func:`shard_indices`, :func:`group_batches`), so tests
check every rank of a world in one process. Every rank gets the same number of samples (the order is
padded by repetition, as ``torch.utils.data.DistributedSampler`` does) and so the same number of
batches: Horovod ranks must run the same number of steps.

Resuming mid-epoch: the order of epoch ``e`` is a function of (seed, e, rank, world), so a
checkpoint records only the epoch and how many batches the training loop consumed in it (the loop
counts them itself: DataLoader workers fetch ahead of it, so the sampler cannot know). The trainer::

    batch_sampler = GroupedBatchSampler(DistributedShardSampler(ds, rank, size, seed), ds.aspect_ratios(), 2)
    loader = DataLoader(SeededDataset(ds, seed), batch_sampler=EpochTagged(batch_sampler), ...)
    batch_sampler.set_epoch(epoch, start=batches_done)   # before iterating the loader for `epoch`

Augmentation randomness is a function of (seed, epoch, index) too (:class:`SeededDataset`): the batch
sampler's indices travel to the workers tagged with their epoch (:class:`EpochTagged`), which
persistent workers need, since they never see the main process's later attribute changes.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

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
    """Every index exactly once, in ``len(indices) // batch_size`` batches, most of one aspect group.

    The count is what :func:`hvd_megdet.lr_schedule.iters_per_epoch` counts, so equal-length samplers
    give every rank the same number of batches (Horovod ranks must run the same number of steps).

    * Batches of one group come first, in the order they fill up.
    * The leftovers of the two groups (fewer than ``batch_size`` each) follow in mixed batches:
      landscape leftovers, then portrait, each in the order drawn.
    * When ``len(indices)`` is not a multiple of ``batch_size``, the ``r`` indices that fill no batch
      go one each into the last ``r`` batches, which then hold ``batch_size + 1`` images (more only
      when there are fewer than ``r`` batches). A smaller extra batch would change the step count and
      a padded one would repeat images; one image more in a few batches does neither.
    """
    num_batches = len(indices) // batch_size
    if num_batches < 1:
        raise ValueError(f"{len(indices)} indices fill no batch of {batch_size}")
    buffers: dict[int, list[int]] = {LANDSCAPE: [], PORTRAIT: []}
    batches = []
    for i in indices:
        buffer = buffers[groups[i]]
        buffer.append(i)
        if len(buffer) == batch_size:
            batches.append(buffer.copy())
            buffer.clear()
    leftovers = buffers[LANDSCAPE] + buffers[PORTRAIT]  # fewer than 2 * batch_size
    while len(batches) < num_batches:
        batches.append(leftovers[:batch_size])
        leftovers = leftovers[batch_size:]
    for k, i in enumerate(reversed(leftovers)):  # fewer than batch_size: the share's remainder
        batches[-1 - k % num_batches].append(i)
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
        self.epoch = 0

    def indices(self) -> list[int]:
        """This rank's whole order for the current epoch."""
        return shard_indices(self.dataset_len, self.rank, self.size, self.seed, self.epoch, self.shuffle,
                             self.shard_sizes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        """Samples per epoch on every rank."""
        return self.num_samples


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images are all landscape or all portrait (less padding inside a batch), but for
    the mixed few at the epoch's end that take each group's leftovers (see :func:`group_batches`).

    Every index of the sampler's epoch is yielded exactly once. Deterministic given the sampler's
    order; ``len`` is ``len(sampler) // batch_size`` on every rank.

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
        self.start = 0

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; the next pass skips its first ``start`` batches (a resumed epoch)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start={start} is outside an epoch of {len(self)} batches")
        self.start = start
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def batches(self) -> list[list[int]]:
        """Every batch of the current epoch, from its start."""
        order = self.sampler.indices() if hasattr(self.sampler, "indices") else list(self.sampler)
        return group_batches(order, self.groups, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.start:])

    def __len__(self) -> int:
        """Batches per epoch on every rank (a resumed pass yields fewer)."""
        return len(self.sampler) // self.batch_size


class EpochTagged(Sampler[list[tuple[int, int]]]):
    """``batch_sampler``'s batches with every index paired with the epoch: ``[(epoch, index), ...]``."""

    def __init__(self, batch_sampler: GroupedBatchSampler) -> None:
        self.batch_sampler = batch_sampler
        self.batch_size = batch_sampler.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.batch_sampler.set_epoch(epoch, start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.batch_sampler.epoch
        for batch in self.batch_sampler:
            yield [(epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)


class SeededDataset(Dataset):
    """Indexed by ``(epoch, index)``: each sample's random augmentation is a function of
    (seed, epoch, index), whichever worker loads it and however far any RNG has advanced, so a
    resumed run sees exactly the images an uninterrupted one would."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % 2**63)
            return self.dataset[index]
