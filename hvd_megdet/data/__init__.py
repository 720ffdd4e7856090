"""COCO detection data from HDF5 shards: dataset, distributed samplers, transforms.

The shard layout is defined in :mod:`hvd_megdet.data.h5_schema`; shards are written by ``data_prep``.
The exports below load on first use, so that ``data_prep`` (which needs only ``h5_schema``) starts
without importing torch: 3 s per process, times every rank of an ``mpirun`` packing job.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hvd_megdet.data.h5_dataset import ShardedCocoDataset
    from hvd_megdet.data.samplers import (DistributedShardSampler, EpochTagged, GroupedBatchSampler, SeededDataset,
                                          shard_indices)
    from hvd_megdet.data.transforms import build_transforms, collate_fn

_EXPORTS = {
    "ShardedCocoDataset": "hvd_megdet.data.h5_dataset",
    "DistributedShardSampler": "hvd_megdet.data.samplers",
    "GroupedBatchSampler": "hvd_megdet.data.samplers",
    "EpochTagged": "hvd_megdet.data.samplers",
    "SeededDataset": "hvd_megdet.data.samplers",
    "shard_indices": "hvd_megdet.data.samplers",
    "build_transforms": "hvd_megdet.data.transforms",
    "collate_fn": "hvd_megdet.data.transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
