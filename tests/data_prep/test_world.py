"""Rank arithmetic of packing, for every rank of several worlds."""
import pytest

from data_prep.world import World, block_range, shards_of_rank


@pytest.mark.parametrize("n", [0, 1, 5, 30, 31])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_block_range_covers_in_order_with_balanced_sizes(n, world):
    blocks = [block_range(n, r, world) for r in range(world)]
    assert [i for start, stop in blocks for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("num_shards, world", [(4, 2), (5, 2), (3, 4), (116, 16)])
def test_shards_of_rank_partition(num_shards, world):
    parts = [shards_of_rank(num_shards, r, world) for r in range(world)]
    assert sorted(k for p in parts for k in p) == list(range(num_shards))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_world_collectives_are_identity():
    world = World()
    assert (world.rank, world.size) == (0, 1)
    assert world.allgather("x") == ["x"] and world.gather(3) == [3]
    world.barrier()
    world.abort(1)  # a world of one has nobody to abort
