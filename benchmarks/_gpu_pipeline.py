"""bench_gpu's input pipeline: decode + resize from HDF5 shards on one core, as a DataLoader worker.

Against the fastest row's img/s this says how many loader cores one GPU needs.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from _gpu_rows import Scale


def pipeline_section(args, scale: Scale) -> dict:
    """Decode + resize (the training transforms) from HDF5 shards on one core, in this process."""
    from data_prep import coco_to_hdf5
    from data_prep.synthetic import make_synthetic_coco
    from hvd_megdet.data import ShardedCocoDataset, build_transforms

    h, w = scale.sizes[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each DataLoader worker runs with
    try:
        with tempfile.TemporaryDirectory(prefix="bench_gpu_pipeline_") as tmp:
            ann = make_synthetic_coco(Path(tmp) / "coco", args.pipeline_images, (w, h), seed=0)
            quiet = open(os.devnull, "w")
            stdout, sys.stdout = sys.stdout, quiet  # coco_to_hdf5 reports progress
            try:
                code = coco_to_hdf5.main(["--images", str(Path(tmp) / "coco" / "images"), "--annotations", str(ann),
                                          "--out", str(Path(tmp) / "h5")])
            finally:
                sys.stdout = stdout
                quiet.close()
            if code != 0:
                raise RuntimeError(f"coco_to_hdf5 failed ({code})")
            ds = ShardedCocoDataset(Path(tmp) / "h5", transforms=build_transforms(True, scale.min_size, scale.max_size))
            rates = []
            for rep in range(3):  # the first pass warms the page cache and the shard handles
                start = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                if rep:
                    rates.append(len(ds) / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return {"images": args.pipeline_images, "raw_size": f"{w}x{h}", "resize": f"{scale.min_size}/{scale.max_size}",
            "decode_resize_img_per_s_per_core": max(rates)}

