"""Pack a COCO detection split into HDF5 shards plus ``manifest.json``.

    python -m data_prep.coco_to_hdf5 --images coco/train2017 \\
        --annotations coco/annotations/instances_train2017.json --out coco_h5/train2017
    mpirun -np 16 python -m data_prep.coco_to_hdf5 ...   # same shards, written by 16 ranks

At MegDet's scale every rank reads the whole training set each epoch; 118k small JPEGs times 128
ranks is a metadata storm on a parallel file system, a few hundred large shards are not.

Steps: every rank parses and validates the JSON (cheap, identical everywhere); the ranks split the
image-file checks and share the results; bad items are dropped and tabulated (``--strict``: listed,
and nothing is written); shard k is written by rank k mod N under a temporary name and renamed; a
shard already complete from an earlier run, made from the same inputs, is kept; rank 0 writes the
manifest last, so a directory with a manifest is a finished one.

Every rank holds the parsed JSON (about 2 GB for COCO train2017 with its segmentations): a few ranks
per node are enough, the work is reading and writing files.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from data_prep.coco_records import (NOT_BAD_INPUT, CocoFormatError, Issue, drop_empty_images, drop_images,
                                    format_reason_table, load_coco_json, validate_coco)
from data_prep.image_check import ImageFacts, check_image_file
from data_prep.verify import check_shard
from data_prep.world import World, get_world, shards_of_rank
from hvd_megdet.ranks import split
from data_prep.write_shards import (ShardPlan, build_manifest, plan_shards, sha256_file, write_manifest,
                                    write_shard)
from hvd_megdet.data import h5_schema as S

MAX_LISTED = 20  # bad items printed one per line in the default mode (the manifest lists them all)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coco_to_hdf5", description="Pack a COCO detection split into HDF5 shards.")
    parser.add_argument("--images", required=True, help="image root; JSON file_name is relative to it")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON file")
    parser.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument("--split", default=None,
                        help="split name used in shard names (default: from the JSON file name, "
                             "instances_train2017.json -> train2017)")
    parser.add_argument("--images-per-shard", type=int, default=8192,
                        help="images per shard (default 8192: COCO train2017 in 15 files of ~1.3 GB, which "
                             "persistent workers open >= 167x less often than a JPEG folder even at 128 "
                             "ranks under the global shuffle; benchmarks/bench_loader.py --opens-only)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on any bad input, naming every bad item, before writing anything")
    parser.add_argument("--drop-empty", action="store_true",
                        help="drop images without annotations (as COCO training usually does)")
    parser.add_argument("--drop-segmentation", action="store_true",
                        help="do not store the 'segmentation' field (smaller shards; boxes only)")
    return parser


def split_name(annotation_file: str | Path) -> str:
    """``instances_val2017.json`` -> ``val2017``; any other name -> its stem."""
    stem = Path(annotation_file).stem
    return stem[len("instances_"):] if stem.startswith("instances_") and len(stem) > 10 else stem


def _check_files(records: list, images_dir: str, world: World) -> list[ImageFacts | Issue]:
    share = split(len(records), world.rank, world.size)
    mine = [check_image_file(images_dir, records[i])
            for i in tqdm(share, desc="checking images (rank 0)", disable=world.rank != 0)]
    # dist(world): every rank needs every result to plan identical shards.
    return [res for block in world.allgather(mine) for res in block]


def select_records(coco: dict[str, Any], images_dir: str, drop_empty: bool,
                   world: World = World()) -> tuple[list, list[ImageFacts], list[Issue]]:
    """Validate the JSON and the image files; return kept records, their file facts, and all issues."""
    records, issues = validate_coco(coco)
    results = _check_files(records, images_dir, world)
    facts_of = {rec.id: res for rec, res in zip(records, results) if not isinstance(res, Issue)}
    records, file_issues = drop_images(records, {k: r for k, r in enumerate(results) if isinstance(r, Issue)})
    issues += file_issues
    if drop_empty:
        records, empty = drop_empty_images(records)
        issues += empty
    return records, [facts_of[r.id] for r in records], issues


def _write_my_shards(plans: list[ShardPlan], images_dir: str, out: Path, world: World) -> dict[int, dict]:
    mine = shards_of_rank(len(plans), world.rank, world.size)
    entries, skipped = {}, 0
    total = sum(len(plans[k].records) for k in mine)
    with tqdm(total=total, desc=f"writing shards (rank 0 of {world.size})", disable=world.rank != 0) as bar:
        for k in mine:
            plan, path = plans[k], out / plans[k].file_name
            if path.exists() and not check_shard(path, plan.manifest_entry(""), plan_sha256=plan.plan_sha256()):
                skipped += 1
                bar.update(len(plan.records))
            else:
                write_shard(plan, images_dir, out, on_image=lambda: bar.update(1))
            entries[k] = plan.manifest_entry(sha256_file(path))
    if skipped:
        print(f"rank {world.rank}: kept {skipped} shard(s) already complete from an earlier run", flush=True)
    return entries


def pack(args: argparse.Namespace, world: World) -> int:
    """Run the packing on this rank; see the module docstring. Returns the exit code."""
    coco = load_coco_json(args.annotations)
    split = args.split or split_name(args.annotations)
    records, facts, issues = select_records(coco, args.images, args.drop_empty, world)
    bad = [i for i in issues if i.reason not in NOT_BAD_INPUT]
    if args.strict and bad:
        if world.rank == 0:
            print(f"--strict: {len(bad)} bad item(s) in {args.annotations}; nothing written", file=sys.stderr)
            for issue in bad:
                print("  " + issue.describe(), file=sys.stderr)
            print(format_reason_table(bad), file=sys.stderr)
        return 2
    try:
        plans = plan_shards(records, facts, split, args.images_per_shard, args.drop_segmentation)
    except ValueError as e:  # nothing left to pack, or a bad --images-per-shard: the same on every rank
        if world.rank == 0:
            print(f"coco_to_hdf5: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if world.rank == 0:
        # A directory with a manifest is a finished one: the old manifest goes before any shard changes.
        (out / S.MANIFEST_NAME).unlink(missing_ok=True)
        planned = {p.file_name for p in plans}
        for name in (*planned, S.MANIFEST_NAME):  # leftovers of an interrupted run
            (out / (name + S.TMP_SUFFIX)).unlink(missing_ok=True)
        stale = sorted(p.name for p in out.glob(f"{split}-*-of-*.h5") if p.name not in planned)
        if stale:
            print(f"warning: {len(stale)} shard file(s) in {out} are not part of this packing: {stale[:3]}",
                  file=sys.stderr)
    world.barrier()  # dist(world): nobody writes before rank 0 has cleared the old manifest and leftovers
    entries = _write_my_shards(plans, args.images, out, world)
    gathered = world.gather(entries)  # dist(world): shard checksums to rank 0 for the manifest
    if world.rank == 0:
        merged = {k: e for part in gathered for k, e in part.items()}
        manifest = build_manifest(
            split=split, coco=coco, shard_entries=[merged[k] for k in range(len(plans))],
            images_per_shard=args.images_per_shard, issues=issues,
            source={"annotation_file": str(Path(args.annotations).resolve()),
                    "annotation_sha256": sha256_file(args.annotations),
                    "images_dir": str(Path(args.images).resolve())},
            options={"drop_empty": args.drop_empty, "drop_segmentation": args.drop_segmentation,
                     "strict": args.strict})
        write_manifest(out, manifest)
        for issue in bad[:MAX_LISTED]:
            print("dropped " + issue.describe())
        if len(bad) > MAX_LISTED:
            print(f"... and {len(bad) - MAX_LISTED} more bad item(s); all are listed in {out / S.MANIFEST_NAME}")
        print(format_reason_table(issues))
        print(f"packed {manifest[S.M_NUM_IMAGES]} images, {manifest[S.M_NUM_ANNOTATIONS]} annotations "
              f"into {len(plans)} shard(s) in {out} ({len(issues)} item(s) dropped)")
    world.barrier()  # dist(world): every rank returns only once the manifest exists
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    world = get_world()
    try:
        return pack(args, world)
    except CocoFormatError as e:
        # Raised identically on every rank (same inputs), so every rank exits cleanly with it.
        if world.rank == 0:
            print(f"coco_to_hdf5: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        world.abort(1)
        raise


if __name__ == "__main__":
    sys.exit(main())
