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
``h5py.File`` (shards), over one cold epoch: dataset construction, fresh workers, one pass.

The synthetic set fits in one shard, so the last table projects whole training runs of COCO train2017
(116 shards of 1024) for every Table 3 config (its ranks, workers per rank, images per rank, epochs),
with the real sampler code: which batches each DataLoader worker gets (round robin), which shards they
touch, and each worker's cache of open shards (``max_open_files``), kept across epochs by persistent
workers or started empty every epoch. A check first runs that model against the real trainer-style
DataLoader on the synthetic set packed into small shards: the counted opens must equal the projected.
"""
from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
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
from hvd_megdet import lr_schedule
from hvd_megdet.config import load_config
from hvd_megdet.data import (DistributedShardSampler, EpochTagged, GroupedBatchSampler, SeededDataset,
                              ShardedCocoDataset, build_transforms, collate_fn)

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


def simulate_opens(shard_sizes: Sequence[int], aspect_ratios: Sequence[float], world: int, workers: int,
                   batch_size: int, shard_shuffle: bool, epochs: int, persistent: bool, max_open_files: int = 256,
                   seed: int = 0, rank: int = 0) -> tuple[int, int]:
    """(files opened, images read) by one rank over ``epochs``, from the real sampler code (no I/O).

    DataLoader hands batches to its workers round robin, restarting the cycle every epoch; each worker
    keeps up to ``max_open_files`` shards open (least recently used closed first), for the whole run
    with persistent workers, or from an empty cache every epoch without. One manifest read per run.
    """
    n = sum(shard_sizes)
    sampler = DistributedShardSampler(_Sized(n, list(shard_sizes)), rank, world, seed, shard_shuffle=shard_shuffle)
    batch_sampler = GroupedBatchSampler(sampler, aspect_ratios, batch_size)
    starts = np.cumsum([0, *shard_sizes])
    workers = max(workers, 1)
    caches: list[OrderedDict] = [OrderedDict() for _ in range(workers)]
    opens, images = 1, 0
    for epoch in range(epochs):
        batch_sampler.set_epoch(epoch)
        if not persistent:
            caches = [OrderedDict() for _ in range(workers)]
        for b, batch in enumerate(batch_sampler.batches()):
            cache = caches[b % workers]
            for shard in np.searchsorted(starts, batch, side="right") - 1:
                if shard in cache:
                    cache.move_to_end(shard)
                    continue
                opens += 1
                cache[shard] = True
                if len(cache) > max_open_files:
                    cache.popitem(last=False)
            images += len(batch)
    return opens, images


def count_trainer_opens(split: Path, workers: int, epochs: int, persistent: bool, shard_shuffle: bool) -> int:
    """Files the trainer's pipeline (DistributedShardSampler, GroupedBatchSampler, EpochTagged,
    SeededDataset, a DataLoader built once) opens under ``split`` in ``epochs`` epochs."""
    before = _OPENS["file"].value + _OPENS["h5"].value
    ds = ShardedCocoDataset(split, transforms=_identity)
    batch_sampler = GroupedBatchSampler(DistributedShardSampler(ds, 0, 1, seed=0, shard_shuffle=shard_shuffle),
                                        ds.aspect_ratios(), 2)
    loader = DataLoader(SeededDataset(ds, 0), batch_sampler=EpochTagged(batch_sampler), num_workers=workers,
                        persistent_workers=persistent and workers > 0, collate_fn=collate_fn)
    for epoch in range(epochs):
        batch_sampler.set_epoch(epoch)
        for _ in loader:
            pass
    del loader
    return _OPENS["file"].value + _OPENS["h5"].value - before


def check_projection(args: argparse.Namespace) -> None:
    """The projection model against counted opens, on the synthetic set packed 16 images per shard."""
    split = args.work_dir / "h5_small_shards"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert coco_to_hdf5.main(["--images", str(args.work_dir / "coco" / "images"), "--annotations",
                                  str(args.work_dir / "coco" / "annotations" / "instances_train.json"),
                                  "--out", str(split), "--images-per-shard", "16"]) == 0
    ds = ShardedCocoDataset(split)
    print(f"\nProjection model against the trainer's DataLoader, synthetic set in {len(ds.shard_sizes)} shards "
          f"of 16, batch 2, 3 epochs (files opened):\n")
    print("| sampler | workers | persistent | counted | projected |")
    print("|---|---|---|---|---|")
    for shard_shuffle in (False, True):
        for workers, persistent in ((2, True), (2, False), (1, True)):
            counted = count_trainer_opens(split, workers, 3, persistent, shard_shuffle)
            projected, _ = simulate_opens(ds.shard_sizes, ds.aspect_ratios(), 1, workers, 2, shard_shuffle, 3,
                                          persistent)
            print(f"| {'shard' if shard_shuffle else 'global'} shuffle | {workers} | {persistent} | {counted} "
                  f"| {projected} |", flush=True)


def table3_configs() -> list[tuple[str, int, int, int, int]]:
    """(config name, ranks, workers per rank, images per rank, epochs) of every Table 3 config."""
    rows = []
    for path in sorted(Path(__file__).resolve().parent.parent.glob("configs/megdet_bs*.yaml")):
        cfg = load_config(path, [])
        batch = int(re.match(r"megdet_bs(\d+)", path.stem).group(1))
        ranks = batch // (cfg.data.images_per_rank * cfg.solver.backward_passes_per_step)
        rows.append((path.stem, ranks, cfg.data.num_workers, cfg.data.images_per_rank,
                     lr_schedule.get_policy(cfg.solver.policy).total_epochs))
    return rows


def _shards(num_images: int, images_per_shard: int) -> list[int]:
    full, rest = divmod(num_images, images_per_shard)
    return [images_per_shard] * full + ([rest] if rest else [])


def project_coco(num_images: int = 118_287, images_per_shard: int = 1024, large: int = 8192) -> None:
    """Shard opens per 1000 images for whole runs of every Table 3 config at COCO scale."""
    sizes, large_sizes = _shards(num_images, images_per_shard), _shards(num_images, large)
    ratios = [0.75 if i % 4 == 0 else 1.33 for i in range(num_images)]  # a quarter portrait, as COCO
    print(f"\nProjected files opened per 1000 images, one rank's whole run of COCO train2017 ({num_images} "
          f"images, {len(sizes)} shards of {images_per_shard} unless said), each Table 3 config. A JPEG folder "
          f"opens 1000. Global shuffle: the paper's (and the configs') sampler; shard shuffle: "
          f"data.shard_shuffle=true.\n")
    print(f"| config | ranks x workers | epochs | global shuffle, workers restarted every epoch | global shuffle, "
          f"persistent workers | global shuffle, persistent workers, {len(large_sizes)} shards of {large} "
          f"| shard shuffle, persistent workers |")
    print("|---|---|---|---|---|---|---|")
    for name, ranks, workers, per_rank, epochs in table3_configs():
        cells = []
        for shards, shard_shuffle, persistent in ((sizes, False, False), (sizes, False, True),
                                                  (large_sizes, False, True), (sizes, True, True)):
            opens, images = simulate_opens(shards, ratios, ranks, workers, per_rank, shard_shuffle, epochs,
                                           persistent)
            per_1000 = 1000 * opens / images
            cells.append(f"{per_1000:.1f} ({1000 / per_1000:.0f}x fewer)")
        print(f"| {name} | {ranks} x {workers} | {epochs} | " + " | ".join(cells) + " |", flush=True)


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
    parser.add_argument("--opens-only", action="store_true", help="skip the throughput table")
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
        if not args.opens_only:
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
        check_projection(args)
    project_coco()
    return 0


if __name__ == "__main__":
    sys.exit(main())
