"""The whole input pipeline in a DataLoader with 2 worker processes: resuming through it, a damaged shard
read in a worker, shards opened once per persistent worker."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from hvd_megdet import errors
from hvd_megdet.data import (DistributedShardSampler, EpochTagged, GroupedBatchSampler, SeededDataset,
                              ShardedCocoDataset, build_transforms, collate_fn)
from hvd_megdet.data import h5_schema
from hvd_megdet.errors import DataError


def _loader(ds: ShardedCocoDataset, workers: int, rank: int = 0) -> tuple[DataLoader, GroupedBatchSampler]:
    sampler = DistributedShardSampler(ds, rank=rank, size=2, seed=4, shard_shuffle=True)
    batch_sampler = GroupedBatchSampler(sampler, ds.aspect_ratios(), batch_size=2)
    loader = DataLoader(ds, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn)
    return loader, batch_sampler


def test_two_workers_deliver_exactly_the_sampled_items(packed_dir: Path):
    ds = ShardedCocoDataset(packed_dir, transforms=build_transforms(False, min_size=72, max_size=120))
    ds[0]  # the parent holds an open shard when the workers fork; they must not use it
    loader, batch_sampler = _loader(ds, workers=2, rank=1)
    batch_sampler.set_epoch(1)
    expected = batch_sampler.batches()
    got = list(loader)
    assert len(got) == len(expected) == len(batch_sampler) == 7  # 30 images, 2 ranks, batches of 2
    for k, ((images, targets), indices) in enumerate(zip(got, expected)):
        assert [int(t["image_id"]) for t in targets] == [ds.image_ids[i] for i in indices]
        if k < len(expected) - 2:  # one aspect group per batch but for the epoch's mixed last two:
            assert len({img.shape[1] >= img.shape[2] for img in images}) == 1  # leftovers, then the remainder
        for image, target, i in zip(images, targets, indices):
            ref_image, ref_target = ds[i]  # eval transforms are deterministic
            assert torch.equal(image, ref_image)
            assert all(torch.equal(target[k], ref_target[k]) for k in ref_target)


def test_resume_through_a_persistent_loader_with_workers(packed_dir: Path):
    ds = ShardedCocoDataset(packed_dir, transforms=build_transforms(False, min_size=48, max_size=80))
    sampler = DistributedShardSampler(ds, rank=0, size=2, seed=4, shard_shuffle=True)
    batch_sampler = GroupedBatchSampler(sampler, ds.aspect_ratios(), batch_size=2)
    # As the trainer builds it: once per run, workers kept across epochs, indices tagged with the epoch.
    loader = DataLoader(SeededDataset(ds, seed=1), batch_sampler=EpochTagged(batch_sampler), num_workers=2,
                        persistent_workers=True, collate_fn=collate_fn)
    ids = {}
    for epoch in (3, 4):
        batch_sampler.set_epoch(epoch)
        ids[epoch] = [[ds.image_ids[i] for i in b] for b in batch_sampler.batches()]
        assert [[int(t["image_id"]) for t in targets] for _, targets in loader] == ids[epoch]
    assert ids[3] != ids[4]
    # Resume epoch 3 after 2 consumed batches (the trainer counts them; the workers fetched ahead).
    batch_sampler.set_epoch(3, start=2)
    assert [[int(t["image_id"]) for t in targets] for _, targets in loader] == ids[3][2:]


def _trainer_loader(ds: ShardedCocoDataset, workers: int, persistent: bool, shard_shuffle: bool = False):
    sampler = DistributedShardSampler(ds, rank=0, size=1, seed=4, shard_shuffle=shard_shuffle)
    batch_sampler = GroupedBatchSampler(sampler, ds.aspect_ratios(), batch_size=2)
    loader = DataLoader(SeededDataset(ds, seed=1), batch_sampler=EpochTagged(batch_sampler), num_workers=workers,
                        persistent_workers=persistent, collate_fn=collate_fn)
    return loader, batch_sampler


def test_damaged_shard_read_in_a_worker_is_one_line_naming_file_and_image(packed_dir: Path, tmp_path: Path):
    split = tmp_path / "train"
    shutil.copytree(packed_dir, split)
    shard = split / "train-00002-of-00004.h5"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])  # the truncated copy
    ds = ShardedCocoDataset(split, transforms=build_transforms(False, min_size=48, max_size=80))
    loader, _ = _trainer_loader(ds, workers=2, persistent=True)
    with pytest.raises(DataError) as caught:
        for _ in loader:
            pass
    err = caught.value
    line = str(err)
    m = re.fullmatch(rf"{re.escape(str(shard))}: cannot read image id (\d+) \(OSError: Unable to synchronously open "
                     rf"file \(truncated file: eof = \d+, .*\)\); check the split with: python -m data_prep verify "
                     rf"{re.escape(str(split))} \(in DataLoader worker process [01]\)", line)
    assert m, line
    assert 16 <= ds.image_ids.index(int(m.group(1))) < 24  # an image of that shard
    # The worker's traceback travels along for --debug; the entry point finds the error in a chain.
    assert "Traceback (most recent call last)" in err.detail and "h5py" in err.detail
    try:
        raise RuntimeError("while training") from err
    except RuntimeError as outer:
        assert errors.user_error(outer) is err
    assert errors.user_error(RuntimeError("a bug")) is None


def _counting_open_shard(log: Path):
    real = h5_schema.open_shard

    def open_shard(path):
        with open(log, "a") as f:  # O_APPEND: lines from several worker processes do not interleave
            f.write(f"{os.getpid()} {Path(path).name}\n")
        return real(path)
    return open_shard


@pytest.mark.parametrize("shard_shuffle", [False, True], ids=["global shuffle", "shard shuffle"])
def test_persistent_workers_open_each_shard_once_per_run(packed_dir: Path, tmp_path: Path, monkeypatch,
                                                         shard_shuffle: bool):
    ds = ShardedCocoDataset(packed_dir, transforms=build_transforms(False, min_size=32, max_size=48))
    opens = {}
    for persistent in (True, False):
        log = tmp_path / f"opens_{persistent}.txt"
        log.touch()
        monkeypatch.setattr(h5_schema, "open_shard", _counting_open_shard(log))  # workers fork with it
        loader, batch_sampler = _trainer_loader(ds, workers=2, persistent=persistent, shard_shuffle=shard_shuffle)
        for epoch in range(3):
            batch_sampler.set_epoch(epoch)
            assert sum(len(images) for images, _ in loader) == 30
        del loader
        opens[persistent] = [tuple(line.split()) for line in log.read_text().splitlines()]
    # Persistent workers: 2 processes for the whole run, each opening a shard at most once.
    assert len({pid for pid, _ in opens[True]}) == 2
    assert len(opens[True]) == len(set(opens[True])) <= 2 * 4
    # Workers started every epoch (the old way): 6 processes, and every epoch opens its shards again.
    assert len({pid for pid, _ in opens[False]}) == 6 and len(opens[False]) == len(set(opens[False]))
    assert len(opens[False]) > len(opens[True])
