"""The whole input pipeline in a DataLoader with 2 worker processes, and resuming through it."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hvd_megdet.data import (DistributedShardSampler, EpochTagged, GroupedBatchSampler, SeededDataset,
                              ShardedCocoDataset, build_transforms, collate_fn)


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
    for (images, targets), indices in zip(got, expected):
        assert [int(t["image_id"]) for t in targets] == [ds.image_ids[i] for i in indices]
        assert len({img.shape[1] >= img.shape[2] for img in images}) == 1  # one aspect group per batch
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
