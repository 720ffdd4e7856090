"""Check every shard of a packed split against its manifest.

    python -m data_prep.verify /data/coco_h5/train2017

Per shard: the file's SHA-256, the image and annotation counts, the image ids and sizes, the
per-image CRC-32s, the hash of all dataset values recorded at writing, and that every image's
header decodes to the stored format and size. Prints one
line per shard and a summary; exits 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import io
import sys
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from data_prep.write_shards import content_sha256, sha256_file
from hvd_megdet.data import h5_schema as S
from hvd_megdet.errors import DataError


def _content_problems(f: Any, entry: dict[str, Any]) -> list[str]:
    missing = [name for name in S.DTYPES if name not in f]
    if missing:
        return [f"missing datasets {missing}"]
    problems = []
    ids = f[S.IMAGE_ID][:]
    n, m = len(ids), len(f[S.ANN_ID])
    if n != entry[S.S_NUM_IMAGES] or f.attrs.get(S.ATTR_NUM_IMAGES) != n:
        problems.append(f"{n} images, manifest says {entry[S.S_NUM_IMAGES]}")
    if m != entry[S.S_NUM_ANNOTATIONS] or f.attrs.get(S.ATTR_NUM_ANNOTATIONS) != m:
        problems.append(f"{m} annotations, manifest says {entry[S.S_NUM_ANNOTATIONS]}")
    for name, key in ((S.IMAGE_ID, S.S_IMAGE_IDS), (S.IMAGE_WIDTH, S.S_WIDTHS), (S.IMAGE_HEIGHT, S.S_HEIGHTS)):
        if f[name][:].tolist() != entry[key]:
            problems.append(f"{name} differs from the manifest's {key}")
    offsets, ann_offsets = f[S.IMAGE_OFFSETS][:], f[S.ANN_OFFSETS][:]
    data = f[S.IMAGE_DATA]
    if (len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0)
            or len(ann_offsets) != n + 1 or ann_offsets[0] != 0 or ann_offsets[-1] != m):
        return problems + ["inconsistent offsets"]
    for name in (S.ANN_BBOX, S.ANN_CATEGORY_ID, S.ANN_ISCROWD, S.ANN_AREA, S.ANN_JSON):
        if len(f[name]) != m:
            problems.append(f"{name} has {len(f[name])} rows, expected {m}")
    data = data[:]  # one sequential read; the shard is read whole for its SHA-256 anyway
    crcs, formats = f[S.IMAGE_CRC32][:], f[S.IMAGE_FORMAT].asstr()[:]
    widths, heights = f[S.IMAGE_WIDTH][:], f[S.IMAGE_HEIGHT][:]
    for k in range(n):
        blob = data[offsets[k]:offsets[k + 1]].tobytes()
        if zlib.crc32(blob) != crcs[k]:
            problems.append(f"image_id={ids[k]}: CRC-32 mismatch")
            continue
        try:
            with Image.open(io.BytesIO(blob)) as im:
                header = (im.format, im.size)
        except (OSError, ValueError, SyntaxError) as e:
            problems.append(f"image_id={ids[k]}: header does not decode ({e})")
            continue
        if header != (formats[k], (widths[k], heights[k])):
            problems.append(f"image_id={ids[k]}: header says {header}, stored {formats[k]} {widths[k]}x{heights[k]}")
    return problems


def check_shard(path: str | Path, entry: dict[str, Any], plan_sha256: str | None = None,
                sha256: str | None = None) -> list[str]:
    """Everything wrong with one shard file (empty list: it is good).

    Args:
        path: the shard file.
        entry: its manifest entry (counts, image ids, widths, heights; ``sha256`` is not used here).
        plan_sha256: if given, the shard's plan hash attribute must equal it (resume check).
        sha256: if given, the file's SHA-256 must equal it.
    """
    path = Path(path)
    if not path.is_file():
        return ["file is missing"]
    try:
        with S.open_shard(path) as f:
            if f.attrs.get(S.ATTR_SCHEMA_VERSION) != S.SCHEMA_VERSION:
                return [f"schema version {f.attrs.get(S.ATTR_SCHEMA_VERSION)}, expected {S.SCHEMA_VERSION}"]
            if plan_sha256 is not None and f.attrs.get(S.ATTR_PLAN_SHA256) != plan_sha256:
                return ["made from other inputs or options (plan hash differs)"]
            problems = _content_problems(f, entry)
            if not problems and f.attrs.get(S.ATTR_CONTENT_SHA256) != content_sha256(f):
                problems.append("dataset values differ from the hash recorded when the shard was written")
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # truncated, damaged, or not HDF5 at all
        return [f"cannot be read as HDF5: {type(e).__name__}: {e}"]
    if sha256 is not None and not problems:
        if sha256_file(path) != sha256:
            problems.append("SHA-256 differs from the manifest")
    return problems


def verify_directory(directory: str | Path) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Check every shard listed in ``directory/manifest.json``.

    Returns:
        shard file name -> its problems (empty when good); and the manifest.
    """
    directory = Path(directory)
    manifest = S.load_manifest(directory)
    results = {}
    for entry in manifest[S.M_SHARDS]:
        results[entry[S.S_FILE]] = check_shard(directory / entry[S.S_FILE], entry, sha256=entry[S.S_SHA256])
    total = sum(e[S.S_NUM_IMAGES] for e in manifest[S.M_SHARDS])
    if total != manifest[S.M_NUM_IMAGES]:
        results[S.MANIFEST_NAME] = [f"shards hold {total} images, manifest says {manifest[S.M_NUM_IMAGES]}"]
    return results, manifest


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verify", description="Check HDF5 shards against their manifest.json.")
    parser.add_argument("directory", help="directory holding manifest.json and the shards")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        results, manifest = verify_directory(args.directory)
    except (OSError, ValueError, DataError) as e:  # no split directory, or its manifest is missing or malformed
        print(f"verify: {e}", file=sys.stderr)
        return 1
    bad = {name: problems for name, problems in results.items() if problems}
    for name, problems in results.items():
        print(f"{'BAD ' if problems else 'ok  '} {name}" + "".join(f"\n      - {p}" for p in problems))
    print(f"{args.directory}: split {manifest[S.M_SPLIT]!r}, {manifest[S.M_NUM_IMAGES]} images, "
          f"{manifest[S.M_NUM_ANNOTATIONS]} annotations, {len(manifest[S.M_SHARDS])} shards: "
          + (f"{len(bad)} with problems" if bad else "all good"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
