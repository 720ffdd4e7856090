"""Input pipeline throughput and file opens: ShardedCocoDataset vs torchvision CocoDetection.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_loader --images 300 --size 320x240

Both read the same synthetic COCO set (``data_prep.synthetic``): CocoDetection from the JPEG folder,
ShardedCocoDataset from its HDF5 shards (``data_prep.coco_to_hdf5``, default shard size). Both produce
the same (float image, target) pairs through the same transforms, in the same random order, through a
DataLoader with 0, 1 and 2 workers. For each setting the two run ``--repeats`` times after a warm-up
pass (which also starts the persistent workers), alternating which goes first. Reported: the best
pass of each, and the median over repeats of the ratio of the two passes of a pair, which damps noise
from other processes on a shared machine.

File opens are counted in every process (workers are forked with the counters) for paths under the
dataset directory: ``builtins.open`` (JPEGs opened by Pillow, the annotation JSON, the manifest) and
``h5py.File`` (shards), over one cold epoch: dataset construction, fresh workers, one pass. The
synthetic set fits in one shard, so the last table projects one rank's epoch of COCO train2017 at the
paper's scale with the real sampler code (which shards each DataLoader worker touches).
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from torchvision.datasets import CocoDetection
from torchvision.transforms.functional import pil_to_tensor

from data_prep import coco_to_hdf5
from data_prep.synthetic import make_synthetic_coco, parse_size
from hvd_megdet.data import (DistributedShardSampler, GroupedBatchSampler, ShardedCocoDataset, build_transforms,
                              collate_fn)

_OPENS = {"file": mp.Value("q", 0), "h5": mp.Value("q", 0)}
_ROOT = [""]  # only paths under this prefix are counted
KINDS = ("sharded", "jpeg")


def _bump(kind: str) -> None:
    with _OPENS[kind].get_lock():
        _OPENS[kind].value += 1


def _install_open_counters() -> None:
    real_open, real_file = builtins.open, h5py.File

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(_ROOT[0]):
            _bump("file")
        return real_open(file, *args, **kwargs)

    class CountingFile(real_file):  # type: ignore[misc, valid-type]
        def __init__(self, name: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(name, (str, os.PathLike)) and str(name).startswith(_ROOT[0]):
                _bump("h5")
            super().__init__(name, *args, **kwargs)

    builtins.open, h5py.File = counting_open, CountingFile


class _Sized:
    def __init__(self, n: int, shard_sizes: list[int]) -> None:
        self.n, self.shard_sizes = n, shard_sizes

    def __len__(self) -> int:
        return self.n


def _identity(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    return image, target


class CocoToTarget:
    """CocoDetection's (PIL image, annotation list) -> (float tensor, target) as ShardedCocoDataset gives,
    following torchvision's detection reference (crowd boxes dropped, xywh -> clamped xyxy)."""

    def __init__(self, category_ids: Sequence[int], transforms: Any) -> None:
        self.label_of = {cid: k for k, cid in enumerate(sorted(category_ids), start=1)}
        self.transforms = transforms

    def __call__(self, image: Any, anns: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w, h = image.size
        tensor = pil_to_tensor(image.convert("RGB")).float().div_(255)
        anns = [a for a in anns if a["iscrowd"] == 0]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        size = torch.tensor([h, w])
        target = {"boxes": boxes.float(), "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns]),
                  "image_id": torch.tensor(anns[0]["image_id"] if anns else -1),
                  "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
                  "iscrowd": torch.zeros(len(anns), dtype=torch.int64), "orig_size": size, "size": size.clone()}
        return self.transforms(tensor, target)


def _make_dataset(kind: str, args: argparse.Namespace, transforms: Any) -> Any:
    if kind == "sharded":
        return ShardedCocoDataset(args.work_dir / "h5", transforms=transforms)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ds = CocoDetection(str(args.work_dir / "coco" / "images"),
                           str(args.work_dir / "coco" / "annotations" / "instances_train.json"))
    ds.transforms = CocoToTarget(ds.coco.getCatIds(), transforms)
    return ds


def _one_pass(loader: DataLoader) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return time.perf_counter() - start, n


def _loader(ds: Any, args: argparse.Namespace, workers: int, persistent: bool) -> DataLoader:
    return DataLoader(ds, batch_size=args.batch_size, num_workers=workers, collate_fn=collate_fn,
                      sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
                      persistent_workers=persistent and workers > 0)


def run_setting(args: argparse.Namespace, workers: int, transforms: Any) -> dict[str, dict[str, float]]:
    """Best images/s of each dataset and the median ratio of paired passes, at one worker count."""
    loaders = {kind: _loader(_make_dataset(kind, args, transforms), args, workers, persistent=True) for kind in KINDS}
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for kind in KINDS:
        _one_pass(loaders[kind])  # warm-up: page cache, worker start-up
    for rep in range(args.repeats):
        for kind in (KINDS if rep % 2 == 0 else KINDS[::-1]):  # alternate who goes first
            seconds, n = _one_pass(loaders[kind])
            rates[kind].append(n / seconds)
    del loaders  # ends the persistent workers
    ratio = statistics.median(s / j for s, j in zip(rates["sharded"], rates["jpeg"]))
    return {kind: {"img_s": max(rates[kind]), "ratio": ratio} for kind in KINDS}


def count_opens(args: argparse.Namespace, workers: int) -> dict[str, float]:
    """Files opened per 1000 images for one cold epoch: dataset construction, fresh workers, one pass."""
    result = {}
    for kind in KINDS:
        before = _OPENS["file"].value + _OPENS["h5"].value
        _, n = _one_pass(_loader(_make_dataset(kind, args, _identity), args, workers, persistent=False))
        result[kind] = 1000 * (_OPENS["file"].value + _OPENS["h5"].value - before) / n
    return result


def projected_opens(num_images: int, images_per_shard: int, world: int, workers: int, batch_size: int,
                    shard_shuffle: bool, seed: int = 0) -> float:
    """Shard opens per 1000 images of one rank's epoch at scale, from the real sampler code (no I/O).

    DataLoader hands batches to workers round robin; each worker opens every shard it touches once
    (the handle cache holds them), plus one manifest read per dataset construction.
    """
    full, rest = divmod(num_images, images_per_shard)
    sizes = [images_per_shard] * full + ([rest] if rest else [])
    sampler = DistributedShardSampler(_Sized(num_images, sizes), 0, world, seed, shard_shuffle=shard_shuffle)
    ratios = [0.75 if i % 4 == 0 else 1.33 for i in range(num_images)]
    batches = GroupedBatchSampler(sampler, ratios, batch_size).batches()
    starts = np.cumsum([0] + sizes)
    touched = [set() for _ in range(max(workers, 1))]
    for b, batch in enumerate(batches):
        touched[b % max(workers, 1)].update(np.searchsorted(starts, batch, side="right") - 1)
    return 1000 * (1 + sum(len(t) for t in touched)) / (len(batches) * batch_size)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=parse_size, default=(320, 240), help="WxH of the synthetic images")
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(1)  # what each DataLoader worker uses too
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        args.work_dir = (args.work_dir or Path(tmp)).resolve()
        ann = make_synthetic_coco(args.work_dir / "coco", args.images, args.size, seed=0)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert coco_to_hdf5.main(["--images", str(args.work_dir / "coco" / "images"), "--annotations", str(ann),
                                      "--out", str(args.work_dir / "h5")]) == 0
        _ROOT[0] = str(args.work_dir)
        _install_open_counters()
        train = build_transforms(True, args.min_size, args.max_size)
        pipelines = {f"decode+resize {args.min_size}/{args.max_size}": train, "decode only": _identity}
        print(f"{args.images} synthetic JPEGs of {args.size[0]}x{args.size[1]} (a quarter portrait), batch "
              f"{args.batch_size}, torch threads 1, {os.cpu_count()} CPUs, best of {args.repeats} passes "
              f"(ratio: median of paired passes), torch {torch.__version__}\n")
        print("| pipeline | workers | ShardedCocoDataset img/s | CocoDetection (JPEG folder) img/s | ratio |")
        print("|---|---|---|---|---|")
        for name, transforms in pipelines.items():
            for workers in args.workers:
                r = run_setting(args, workers, transforms)
                print(f"| {name} | {workers} | {r['sharded']['img_s']:.1f} | {r['jpeg']['img_s']:.1f} "
                      f"| {r['sharded']['ratio']:.2f}x |", flush=True)
        print("\nFiles opened per 1000 images, one cold epoch (construction, fresh workers, one pass):\n")
        print("| workers | ShardedCocoDataset | CocoDetection (JPEG folder) | fewer opens |")
        print("|---|---|---|---|")
        for workers in args.workers:
            o = count_opens(args, workers)
            print(f"| {workers} | {o['sharded']:.1f} | {o['jpeg']:.1f} | {o['jpeg'] / o['sharded']:.0f}x |",
                  flush=True)
    n, per_shard, world, workers = 118_287, 1024, 128, 2
    print(f"\nProjected shard opens per 1000 images, one rank's epoch of COCO train2017 ({n} images, "
          f"{per_shard} per shard), {world} ranks, {workers} workers, batch 2 (JPEG folder: 1000):\n")
    print("| sampler | opens per 1000 images | fewer than JPEG folder |")
    print("|---|---|---|")
    for shard_shuffle in (False, True):
        per_1000 = projected_opens(n, per_shard, world, workers, 2, shard_shuffle)
        print(f"| DistributedShardSampler(shard_shuffle={shard_shuffle}) | {per_1000:.1f} | {1000 / per_1000:.0f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
