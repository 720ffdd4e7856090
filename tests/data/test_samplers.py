"""Sampler properties for every rank of worlds of 1 to 8 ranks (pure functions, no processes)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from hvd_megdet import lr_schedule
from hvd_megdet.data import DistributedShardSampler, EpochTagged, GroupedBatchSampler, SeededDataset, shard_indices
from hvd_megdet.data.samplers import LANDSCAPE, PORTRAIT, aspect_groups, epoch_order, group_batches


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("n", [30, 31, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_equal_lengths_disjoint_and_padded_by_repetition(world, n, shuffle):
    parts = [shard_indices(n, r, world, seed=5, epoch=2, shuffle=shuffle) for r in range(world)]
    per_rank = math.ceil(n / world)
    assert [len(p) for p in parts] == [per_rank] * world
    flat = [i for p in parts for i in p]
    assert sorted(flat[:n]) == list(range(n))  # before the padding: every index exactly once
    counts = Counter(flat)
    assert set(counts) == set(range(n)) and max(counts.values()) <= math.ceil(per_rank * world / n)
    assert sum(counts.values()) - n == per_rank * world - n  # padding = repetitions only
    if not shuffle:
        assert flat[:n] == list(range(n))


def test_order_depends_on_epoch_and_seed_only():
    a = shard_indices(100, 1, 4, seed=0, epoch=0)
    assert a == shard_indices(100, 1, 4, seed=0, epoch=0)
    assert a != shard_indices(100, 1, 4, seed=0, epoch=1)
    assert a != shard_indices(100, 1, 4, seed=1, epoch=0)
    assert sorted(epoch_order(100, 0, 3)) == list(range(100))


def _shards_of(indices: list[int], shard_size: int) -> set[int]:
    return {i // shard_size for i in indices}


@pytest.mark.parametrize("world", [2, 4])
def test_shard_granularity_keeps_each_rank_on_few_files(world):
    n, shard_size = 1000, 100
    sizes = [shard_size] * (n // shard_size)
    per_rank = math.ceil(n / world)
    for r in range(world):
        mine = shard_indices(n, r, world, seed=0, epoch=1, shard_sizes=sizes)
        touched = _shards_of(mine, shard_size)
        assert len(touched) <= math.ceil(per_rank / shard_size) + 1  # vs all 10 with a global shuffle
        switches = sum(a // shard_size != b // shard_size for a, b in zip(mine, mine[1:]))
        assert switches > 4 * len(touched)  # the rank's shards are interleaved, not read one after another
    assert len(_shards_of(shard_indices(n, 0, world, seed=0, epoch=1), shard_size)) == 10
    flat = [i for r in range(world) for i in shard_indices(n, r, world, 0, 1, shard_sizes=sizes)]
    assert sorted(flat) == list(range(n))
    assert shard_indices(n, 0, world, 0, 1, shard_sizes=sizes) != shard_indices(n, 0, world, 0, 2, shard_sizes=sizes)


def test_bad_arguments():
    with pytest.raises(ValueError):
        shard_indices(10, 2, 2)
    with pytest.raises(ValueError):
        shard_indices(10, 0, 2, shard_sizes=[3, 3])


class _DS:
    def __init__(self, n: int, shard_size: int = 8) -> None:
        self.n = n
        self.shard_sizes = [shard_size] * (n // shard_size) + ([n % shard_size] if n % shard_size else [])

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("shard_shuffle", [False, True])
def test_sampler_iterates_its_share_of_each_epoch(shard_shuffle):
    ds = _DS(30)
    s = DistributedShardSampler(ds, rank=1, size=4, seed=3, shard_shuffle=shard_shuffle)
    s.set_epoch(2)
    full = list(s)
    assert len(s) == len(full) == 8
    assert full == shard_indices(30, 1, 4, 3, 2, shard_sizes=ds.shard_sizes if shard_shuffle else None)
    assert list(s) == full  # a pure function of the epoch
    s.set_epoch(3)
    assert list(s) == shard_indices(30, 1, 4, 3, 3, shard_sizes=ds.shard_sizes if shard_shuffle else None)


def test_group_batches_pure_and_exactly_once():
    groups = [LANDSCAPE, PORTRAIT, LANDSCAPE, LANDSCAPE, PORTRAIT, LANDSCAPE, PORTRAIT, LANDSCAPE, LANDSCAPE]
    order = [8, 1, 0, 4, 2, 3, 6, 5, 7]
    assert group_batches(order, groups, 3) == [[8, 0, 2], [1, 4, 6], [3, 5, 7]]
    # 9 = 4 x 2 + 1: the portrait left over (6) joins the last batch rather than being dropped.
    assert group_batches(order, groups, 2) == [[8, 0], [1, 4], [2, 3], [5, 7, 6]]
    # One full landscape batch; the leftovers (landscape 5, 7 then portrait 1, 4, 6) make one mixed
    # batch, and the ninth image joins it. The old code repeated portrait 1 and never showed 5 and 7.
    assert group_batches(order, groups, 4) == [[8, 0, 2, 3], [5, 7, 1, 4, 6]]
    assert group_batches([0, 2, 3, 5, 7, 1, 4], groups, 3) == [[0, 2, 3], [5, 7, 1, 4]]
    # A remainder of r goes one image each into the last r batches.
    assert group_batches([0, 2, 3, 5, 7, 8, 1, 4], groups, 3) == [[0, 2, 3, 1], [5, 7, 8, 4]]
    assert aspect_groups([1.5, 1.0, 0.75]) == [LANDSCAPE, LANDSCAPE, PORTRAIT]
    with pytest.raises(ValueError, match="fill no batch"):
        group_batches([0, 1], groups, 3)


@pytest.mark.parametrize("world", [2, 4])
def test_grouped_batches_same_count_on_every_rank_and_pure(world):
    n = 53
    ratios = [0.75 if i % 3 == 0 else 1.33 for i in range(n)]  # a third portrait
    counts = []
    for r in range(world):
        s = DistributedShardSampler(_DS(n), r, world, seed=1)
        gb = GroupedBatchSampler(s, ratios, batch_size=3)
        batches = list(gb)
        counts.append(len(batches))
        assert len(batches) == len(gb) == len(s) // 3
        assert batches == list(gb)  # deterministic
        assert Counter(i for b in batches for i in b) == Counter(s.indices())  # the whole share, once
        # Group batches first; only the last few (leftovers, the share's remainder) may mix.
        remainder = len(s) % 3
        assert all(len(b) == 3 and len({ratios[i] >= 1 for i in b}) == 1 for b in batches[:-1 - remainder])
        assert [len(b) for b in batches[len(batches) - remainder:]] == [4] * remainder
    assert len(set(counts)) == 1


def _uneven_ratios(n: int) -> list[float]:
    """About 70% landscape and 30% portrait, in no pattern a shuffle could line up with."""
    rng = np.random.default_rng(n)
    return [1.33 if x < 0.7 else 0.75 for x in rng.random(n)]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shard_shuffle", [False, True])
def test_grouped_epoch_yields_every_image_exactly_once(world, batch_size, shard_shuffle):
    # Over all ranks an epoch holds every image once, plus the DistributedShardSampler's padding: its
    # ceil(n / W) * W - n repeats of the start of the epoch order, so that shares are equal. Nothing
    # else is repeated or left out, whatever the groups' sizes, and every rank has the same count.
    for n in (24, 37, 61, 101):
        per_rank = math.ceil(n / world)
        if per_rank < batch_size:
            continue
        ds, ratios = _DS(n, shard_size=8), _uneven_ratios(n)
        for epoch in (0, 3):
            ranks_batches = []
            for r in range(world):
                gb = GroupedBatchSampler(DistributedShardSampler(ds, r, world, seed=7, shard_shuffle=shard_shuffle),
                                         ratios, batch_size)
                gb.set_epoch(epoch)
                ranks_batches.append(list(gb))
            seen = Counter(i for batches in ranks_batches for b in batches for i in b)
            order = epoch_order(n, 7, epoch, shard_sizes=ds.shard_sizes if shard_shuffle else None)
            padding = Counter(order[:per_rank * world - n])
            assert seen == Counter(range(n)) + padding, (n, epoch, "missing", Counter(range(n)) + padding - seen,
                                                         "extra", seen - Counter(range(n)) - padding)
            assert [len(batches) for batches in ranks_batches] == [per_rank // batch_size] * world, (n, epoch)
            assert per_rank // batch_size == lr_schedule.iters_per_epoch(n, batch_size, world)
            # The share's remainder adds one image to each of the last batches (wrapping round only in a
            # share of fewer batches than that); every other batch holds batch_size images.
            remainder = per_rank % batch_size
            for batches in ranks_batches:
                assert sum(len(b) > batch_size for b in batches) == min(remainder, len(batches))
                assert max(len(b) for b in batches) <= batch_size + math.ceil(remainder / len(batches))


def test_grouped_batch_sampler_resumes_at_the_next_batch():
    n, ratios = 40, [0.75 if i % 4 == 0 else 1.33 for i in range(40)]

    def make() -> GroupedBatchSampler:
        return GroupedBatchSampler(DistributedShardSampler(_DS(n), 0, 2, seed=9), ratios, batch_size=2)

    gb = make()
    gb.set_epoch(4)
    full = list(gb)
    assert len(full) == len(gb) == 10
    again = make()
    again.set_epoch(4, start=3)  # the trainer's resume: 3 batches of epoch 4 were consumed
    assert list(again) == full[3:]
    again.set_epoch(5)
    other = make()
    other.set_epoch(5)
    assert list(again) == list(other) != full
    with pytest.raises(ValueError, match="start=11"):
        again.set_epoch(5, start=11)
    with pytest.raises(ValueError):
        GroupedBatchSampler(DistributedShardSampler(_DS(n), 0, 2), ratios, 21)


def test_epoch_tagged_batches_and_seeded_samples():
    n, ratios = 12, [1.33] * 12
    gb = GroupedBatchSampler(DistributedShardSampler(_DS(n), 0, 1, seed=2), ratios, batch_size=3)
    gb.set_epoch(7, start=1)
    tagged = list(EpochTagged(gb))
    assert tagged == [[(7, i) for i in b] for b in gb.batches()[1:]] and len(EpochTagged(gb)) == 4

    class Noisy:
        def __len__(self):
            return n

        def __getitem__(self, i):
            return torch.rand(2).tolist()

    ds = SeededDataset(Noisy(), seed=5)
    torch.manual_seed(0)
    first = ds[(7, 3)]
    torch.rand(100)  # the global RNG moves on: the sample must not
    assert ds[(7, 3)] == first and ds[(8, 3)] != first and ds[(7, 4)] != first
    before = torch.get_rng_state()
    ds[(1, 1)]
    assert torch.equal(torch.get_rng_state(), before)  # and it does not move the global RNG
