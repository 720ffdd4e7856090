"""The HDF5 shard layout: the one definition shared by the writer (data_prep) and the reader.

A packed split is a directory holding ``manifest.json`` and shard files
``<split>-00000-of-000NN.h5``. Each shard stores up to ``images_per_shard`` images in dataset order:

    images/data          uint8   [total_bytes]  the original image files (JPEG, PNG, ...) concatenated
    images/offsets       int64   [n + 1]        image k is data[offsets[k]:offsets[k + 1]]
    images/crc32         uint32  [n]            zlib.crc32 of each image's bytes (checked by verify)
    images/id            int64   [n]
    images/width         int32   [n]            from the image header (equal to the JSON's)
    images/height        int32   [n]
    images/format        str     [n]            Pillow format name ("JPEG", "PNG", ...)
    images/json          str     [n]            the image entry of the source JSON, verbatim
    annotations/offsets  int64   [n + 1]        image k owns annotations offsets[k]:offsets[k + 1]
    annotations/id       int64   [m]
    annotations/bbox     float64 [m, 4]         COCO xywh, exactly as parsed from the JSON
    annotations/category_id int64 [m]
    annotations/iscrowd  uint8   [m]
    annotations/area     float64 [m]
    annotations/json     str     [m]            the annotation entry of the source JSON, verbatim

The typed arrays serve training without parsing JSON; the JSON strings make the packing lossless
(``read_record`` returns them as the source dicts). Image bytes are stored uncompressed and contiguous:
JPEG does not compress further, and one contiguous slice is the cheapest read HDF5 offers.

The manifest (see the ``M_*`` names) lists the shards with their image ids and sizes, so the reader
knows ``len``, the ids and the aspect ratios without opening any shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hvd_megdet.errors import DataError

SCHEMA_VERSION = 1
FORMAT_NAME = "hvd_megdet.coco_h5"
MANIFEST_NAME = "manifest.json"
TMP_SUFFIX = ".tmp"  # files are written as NAME.tmp, then renamed: nothing is ever half-written

# Datasets inside a shard.
IMAGE_DATA = "images/data"
IMAGE_OFFSETS = "images/offsets"
IMAGE_CRC32 = "images/crc32"
IMAGE_ID = "images/id"
IMAGE_WIDTH = "images/width"
IMAGE_HEIGHT = "images/height"
IMAGE_FORMAT = "images/format"
IMAGE_JSON = "images/json"
ANN_OFFSETS = "annotations/offsets"
ANN_ID = "annotations/id"
ANN_BBOX = "annotations/bbox"
ANN_CATEGORY_ID = "annotations/category_id"
ANN_ISCROWD = "annotations/iscrowd"
ANN_AREA = "annotations/area"
ANN_JSON = "annotations/json"

STR_DTYPE = h5py.string_dtype(encoding="utf-8")
DTYPES: dict[str, Any] = {
    IMAGE_DATA: np.uint8, IMAGE_OFFSETS: np.int64, IMAGE_CRC32: np.uint32, IMAGE_ID: np.int64,
    IMAGE_WIDTH: np.int32, IMAGE_HEIGHT: np.int32, IMAGE_FORMAT: STR_DTYPE, IMAGE_JSON: STR_DTYPE,
    ANN_OFFSETS: np.int64, ANN_ID: np.int64, ANN_BBOX: np.float64, ANN_CATEGORY_ID: np.int64,
    ANN_ISCROWD: np.uint8, ANN_AREA: np.float64, ANN_JSON: STR_DTYPE,
}

# Shard attributes.
ATTR_FORMAT = "format"
ATTR_SCHEMA_VERSION = "schema_version"
ATTR_SPLIT = "split"
ATTR_SHARD_INDEX = "shard_index"
ATTR_NUM_SHARDS = "num_shards"
ATTR_NUM_IMAGES = "num_images"
ATTR_NUM_ANNOTATIONS = "num_annotations"
ATTR_PLAN_SHA256 = "plan_sha256"  # hash of what the shard should hold; a rerun skips a shard whose plan matches
ATTR_CONTENT_SHA256 = "content_sha256"  # hash of every dataset's values: a shard checks itself without a manifest

# Manifest fields.
M_FORMAT = "format"
M_SCHEMA_VERSION = "schema_version"
M_SPLIT = "split"
M_NUM_IMAGES = "num_images"
M_NUM_ANNOTATIONS = "num_annotations"
M_IMAGES_PER_SHARD = "images_per_shard"
M_SHARDS = "shards"
M_CATEGORIES = "categories"
M_INFO = "info"
M_LICENSES = "licenses"
M_SOURCE = "source"  # {"annotation_file", "annotation_sha256", "images_dir"}
M_OPTIONS = "options"  # {"drop_empty", "drop_segmentation", "strict"}
M_DROPPED = "dropped"  # {"counts": {reason: n}, "items": [{reason, image_id, annotation_id, file, detail}]}
# Fields of one entry of manifest["shards"].
S_FILE = "file"
S_NUM_IMAGES = "num_images"
S_NUM_ANNOTATIONS = "num_annotations"
S_SHA256 = "sha256"
S_IMAGE_IDS = "image_ids"
S_WIDTHS = "widths"
S_HEIGHTS = "heights"


def shard_file_name(split: str, index: int, num_shards: int) -> str:
    """``<split>-00003-of-00012.h5``: sorts in dataset order and says how many shards to expect."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.h5"


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read ``directory/manifest.json`` and check that this code understands it.

    Raises:
        DataError: one line naming the path: no such directory, no manifest (the split was never
            packed, or packing did not finish), not JSON, another format or schema version, or
            fields missing or inconsistent.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (expected a split packed by "
                        f"`python -m data_prep coco_to_hdf5`, holding {MANIFEST_NAME} and the shards)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {directory} is not a packed split, or packing did not finish "
                        f"(rerun `python -m data_prep coco_to_hdf5 ... --out {directory}`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({err}); repack the split") from err
    if not isinstance(manifest, dict) or manifest.get(M_FORMAT) != FORMAT_NAME:
        found = manifest.get(M_FORMAT) if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: not a {FORMAT_NAME} manifest (format={found!r})")
    if manifest.get(M_SCHEMA_VERSION) != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {manifest.get(M_SCHEMA_VERSION)}, this code reads "
                        f"{SCHEMA_VERSION}; repack the split with this version of data_prep")
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: malformed manifest: {problem}; repack the split")
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str:
    """What the reader needs but the manifest lacks ("" when nothing)."""
    shards, categories = manifest.get(M_SHARDS), manifest.get(M_CATEGORIES)
    if not isinstance(shards, list) or not shards:
        return f"{M_SHARDS!r} is not a non-empty list"
    if not isinstance(categories, list) or not categories or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and c["id"] >= 0 for c in categories):
        return f"{M_CATEGORIES!r} is not a non-empty list of categories with integer ids"
    for k, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shard entry {k} is not an object"
        missing = [key for key in (S_FILE, S_NUM_IMAGES, S_IMAGE_IDS, S_WIDTHS, S_HEIGHTS) if key not in entry]
        if missing:
            return f"shard entry {k} lacks {missing}"
        if not all(isinstance(entry[key], list) for key in (S_IMAGE_IDS, S_WIDTHS, S_HEIGHTS)):
            return f"shard entry {k} ({entry[S_FILE]}): image ids, widths or heights are not lists"
    return ""


def manifest_count_problem(manifest: dict[str, Any]) -> str:
    """A shard entry whose image count disagrees with its lists of ids and sizes ("" when none).

    The reader needs them to agree; ``verify`` reports such a shard among the others instead.
    """
    for k, entry in enumerate(manifest[M_SHARDS]):
        n = entry[S_NUM_IMAGES]
        if not all(len(entry[key]) == n for key in (S_IMAGE_IDS, S_WIDTHS, S_HEIGHTS)):
            return f"shard entry {k} ({entry[S_FILE]}): image ids, widths and heights do not list {n} images"
    return ""


def open_shard(path: str | Path) -> h5py.File:
    """Open a shard read-only without HDF5 file locking.

    Locking is off because many ranks read the same files at once and several parallel file systems
    (Lustre without flock, some NFS mounts) fail or serialise on HDF5's advisory locks.
    """
    return h5py.File(path, "r", locking=False)
