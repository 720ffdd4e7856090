"""Validated records -> shard files (temporary name, then rename) and ``manifest.json``.

Shard k holds images ``[k * images_per_shard, (k + 1) * images_per_shard)`` of the kept images in
source order, so the shards depend only on the inputs and options, never on how many ranks wrote them.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np

from data_prep.coco_records import ImageRecord, Issue, count_reasons
from data_prep.image_check import ImageFacts, image_path
from hvd_megdet.data import h5_schema as S


@dataclass(frozen=True)
class ShardPlan:
    """What one shard file will hold."""

    index: int
    num_shards: int
    split: str
    records: tuple[ImageRecord, ...]
    facts: tuple[ImageFacts, ...]
    drop_segmentation: bool

    @property
    def file_name(self) -> str:
        return S.shard_file_name(self.split, self.index, self.num_shards)

    def annotations(self, record: ImageRecord) -> list[dict[str, Any]]:
        """The annotation dicts as stored (without 'segmentation' under --drop-segmentation)."""
        if not self.drop_segmentation:
            return record.annotations
        return [{k: v for k, v in a.items() if k != "segmentation"} for a in record.annotations]

    def plan_sha256(self) -> str:
        """Hash of everything the shard is made from: a finished shard with this hash is up to date."""
        content = [S.SCHEMA_VERSION, self.split, self.index, self.num_shards, self.drop_segmentation,
                   [[r.info, self.annotations(r), f.num_bytes, f.crc32] for r, f in zip(self.records, self.facts)]]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def manifest_entry(self, sha256: str) -> dict[str, Any]:
        return {
            S.S_FILE: self.file_name,
            S.S_NUM_IMAGES: len(self.records),
            S.S_NUM_ANNOTATIONS: sum(len(r.annotations) for r in self.records),
            S.S_SHA256: sha256,
            S.S_IMAGE_IDS: [r.id for r in self.records],
            S.S_WIDTHS: [r.info["width"] for r in self.records],
            S.S_HEIGHTS: [r.info["height"] for r in self.records],
        }


def plan_shards(records: Sequence[ImageRecord], facts: Sequence[ImageFacts], split: str,
                images_per_shard: int, drop_segmentation: bool = False) -> list[ShardPlan]:
    """Cut the kept images into consecutive shards of ``images_per_shard`` (the last may be smaller)."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    if not records:
        raise ValueError("no images left to pack")
    num_shards = -(-len(records) // images_per_shard)
    return [ShardPlan(k, num_shards, split, tuple(records[k * images_per_shard:(k + 1) * images_per_shard]),
                      tuple(facts[k * images_per_shard:(k + 1) * images_per_shard]), drop_segmentation)
            for k in range(num_shards)]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(f: h5py.File) -> str:
    """SHA-256 over the values of every dataset of the schema, in a fixed order."""
    digest = hashlib.sha256()
    for name in sorted(S.DTYPES):
        digest.update(name.encode() + b"\0")
        if S.DTYPES[name] is S.STR_DTYPE:
            for text in (f[name].asstr()[:] if len(f[name]) else []):
                digest.update(text.encode() + b"\0")
        else:
            digest.update(f[name][:].tobytes())
    return digest.hexdigest()


def _put(f: h5py.File, name: str, values: Any) -> None:
    dtype = S.DTYPES[name]
    if dtype is S.STR_DTYPE:
        array = np.array(values, dtype=object).reshape(-1)
    else:
        array = np.asarray(values, dtype=dtype)
    if name == S.ANN_BBOX:
        array = array.reshape(-1, 4)
    f.create_dataset(name, data=array, dtype=dtype)


def _dumps(obj: Any) -> str:
    # Compact, key order kept: json.loads gives back a dict equal to the source entry.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def write_shard(plan: ShardPlan, images_dir: str | Path, out_dir: str | Path,
                on_image: Callable[[], None] | None = None) -> Path:
    """Write one shard to ``NAME.tmp`` and rename it to ``NAME`` once complete.

    Raises:
        RuntimeError: an image file changed since it was checked (its CRC-32 differs).
    """
    out_dir = Path(out_dir)
    final = out_dir / plan.file_name
    tmp = out_dir / (plan.file_name + S.TMP_SUFFIX)
    sizes = np.array([f.num_bytes for f in plan.facts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    anns = [plan.annotations(r) for r in plan.records]
    flat = [a for per_image in anns for a in per_image]
    with h5py.File(tmp, "w") as f:
        data = f.create_dataset(S.IMAGE_DATA, shape=(int(offsets[-1]),), dtype=S.DTYPES[S.IMAGE_DATA])
        for k, (record, facts) in enumerate(zip(plan.records, plan.facts)):
            blob = image_path(images_dir, record.file_name).read_bytes()
            if len(blob) != facts.num_bytes or zlib.crc32(blob) != facts.crc32:
                raise RuntimeError(f"image_id={record.id} file={record.file_name}: changed while packing")
            data[offsets[k]:offsets[k + 1]] = np.frombuffer(blob, dtype=np.uint8)
            if on_image is not None:
                on_image()
        _put(f, S.IMAGE_OFFSETS, offsets)
        _put(f, S.IMAGE_CRC32, [x.crc32 for x in plan.facts])
        _put(f, S.IMAGE_ID, [r.id for r in plan.records])
        _put(f, S.IMAGE_WIDTH, [r.info["width"] for r in plan.records])
        _put(f, S.IMAGE_HEIGHT, [r.info["height"] for r in plan.records])
        _put(f, S.IMAGE_FORMAT, [x.format for x in plan.facts])
        _put(f, S.IMAGE_JSON, [_dumps(r.info) for r in plan.records])
        _put(f, S.ANN_OFFSETS, np.concatenate([[0], np.cumsum([len(a) for a in anns])]))
        _put(f, S.ANN_ID, [a["id"] for a in flat])
        _put(f, S.ANN_BBOX, [a["bbox"] for a in flat])
        _put(f, S.ANN_CATEGORY_ID, [a["category_id"] for a in flat])
        _put(f, S.ANN_ISCROWD, [a["iscrowd"] for a in flat])
        _put(f, S.ANN_AREA, [a["area"] for a in flat])
        _put(f, S.ANN_JSON, [_dumps(a) for a in flat])
        f.attrs.update({
            S.ATTR_FORMAT: S.FORMAT_NAME, S.ATTR_SCHEMA_VERSION: S.SCHEMA_VERSION, S.ATTR_SPLIT: plan.split,
            S.ATTR_SHARD_INDEX: plan.index, S.ATTR_NUM_SHARDS: plan.num_shards,
            S.ATTR_NUM_IMAGES: len(plan.records), S.ATTR_NUM_ANNOTATIONS: len(flat),
            S.ATTR_PLAN_SHA256: plan.plan_sha256(), S.ATTR_CONTENT_SHA256: content_sha256(f),
        })
    os.replace(tmp, final)
    return final


def build_manifest(*, split: str, coco: dict[str, Any], shard_entries: list[dict[str, Any]],
                   images_per_shard: int, source: dict[str, Any], options: dict[str, Any],
                   issues: list[Issue]) -> dict[str, Any]:
    """The manifest: everything the reader needs besides the shards, and what was dropped and why."""
    return {
        S.M_FORMAT: S.FORMAT_NAME,
        S.M_SCHEMA_VERSION: S.SCHEMA_VERSION,
        S.M_SPLIT: split,
        S.M_NUM_IMAGES: sum(e[S.S_NUM_IMAGES] for e in shard_entries),
        S.M_NUM_ANNOTATIONS: sum(e[S.S_NUM_ANNOTATIONS] for e in shard_entries),
        S.M_IMAGES_PER_SHARD: images_per_shard,
        S.M_CATEGORIES: coco["categories"],
        S.M_INFO: coco.get("info", {}),
        S.M_LICENSES: coco.get("licenses", []),
        S.M_SOURCE: source,
        S.M_OPTIONS: options,
        S.M_DROPPED: {"counts": count_reasons(issues), "items": [i.as_dict() for i in issues]},
        S.M_SHARDS: shard_entries,
    }


def _manifest_text(manifest: dict[str, Any]) -> str:
    """Indented JSON, except one line per shard and per dropped item (COCO has 116 and 118k-id lists)."""
    def lines(items: list[Any]) -> str:
        return "[" + ",".join("\n  " + json.dumps(x, ensure_ascii=False) for x in items) + ("\n ]" if items else "]")

    parts = []
    for key, value in manifest.items():
        if key == S.M_SHARDS:
            text = lines(value)
        elif key == S.M_DROPPED:
            text = ('{"counts": ' + json.dumps(value["counts"]) + ',\n "items": ' + lines(value["items"]) + "}")
        else:
            text = json.dumps(value, ensure_ascii=False)
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temporary name, then rename)."""
    final = Path(out_dir) / S.MANIFEST_NAME
    tmp = final.with_name(final.name + S.TMP_SUFFIX)
    tmp.write_text(_manifest_text(manifest), encoding="utf-8")
    os.replace(tmp, final)
    return final
