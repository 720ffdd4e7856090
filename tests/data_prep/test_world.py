"""Rank arithmetic of packing, for every rank of several worlds."""
import pytest

from data_prep.world import World, get_world, shards_of_rank


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


def test_several_ranks_without_mpi4py_stop_instead_of_running_as_one(monkeypatch):
    # Every rank would otherwise pack the whole set into the same output directory.
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setitem(__import__("sys").modules, "mpi4py", None)
    with pytest.raises(SystemExit, match=r"rank 1 of 2 by openmpi, but mpi4py is not importable"):
        get_world()
