"""COCO annotation JSON -> validated image records, plus a report of everything dropped and why.

Everything here is pure (no file access) except :func:`load_coco_json`. Image files are checked
separately (see ``image_check.py``) so that ranks can share that work. A bad item is never fixed up:
it is dropped with an :class:`Issue` naming the image id, annotation id and file, and ``--strict``
turns any issue into a failure before anything is written.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

# Reasons for dropping an item. The first group is bad input (``--strict`` fails on it); the last
# two are consequences or choices, reported but never an error.
MALFORMED_IMAGE = "malformed_image_entry"
DUPLICATE_IMAGE_ID = "duplicate_image_id"
MISSING_IMAGE_FILE = "missing_image_file"
CORRUPT_IMAGE_FILE = "corrupt_image_file"
IMAGE_SIZE_MISMATCH = "image_size_mismatch"
MALFORMED_ANNOTATION = "malformed_annotation"
DUPLICATE_ANNOTATION_ID = "duplicate_annotation_id"
ANNOTATION_FOR_MISSING_IMAGE = "annotation_for_missing_image"
UNKNOWN_CATEGORY = "unknown_category_id"
BBOX_NON_POSITIVE = "bbox_non_positive_size"
BBOX_OUTSIDE_IMAGE = "bbox_outside_image"
IMAGE_DROPPED = "annotation_of_dropped_image"
NO_ANNOTATIONS = "image_without_annotations"
NOT_BAD_INPUT = frozenset({IMAGE_DROPPED, NO_ANNOTATIONS})

# COCO boxes are rounded to 2 decimals and some stick out of the image by a fraction of a pixel;
# the reader clamps those. Anything further out is a broken box.
BBOX_TOLERANCE_PX = 1.0
ANNOTATION_FIELDS = ("id", "image_id", "bbox", "category_id", "iscrowd", "area")


class CocoFormatError(ValueError):
    """The annotation file cannot be used at all (not JSON, or not COCO-shaped)."""


@dataclass(frozen=True)
class Issue:
    """One dropped item: why, and which image / annotation / file it was."""

    reason: str
    image_id: int | None = None
    annotation_id: int | None = None
    file: str | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.reason}: image_id={self.image_id} annotation_id={self.annotation_id} "
                f"file={self.file} ({self.detail})")


@dataclass
class ImageRecord:
    """One image entry of the source JSON with its annotations, both verbatim."""

    info: dict[str, Any]
    annotations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> int:
        return self.info["id"]

    @property
    def file_name(self) -> str:
        return self.info["file_name"]


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Parse a COCO instances file; raise :class:`CocoFormatError` naming the file and position."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{path}: not UTF-8 text ({e})") from e
    if not isinstance(coco, dict):
        raise CocoFormatError(f"{path}: top level is {type(coco).__name__}, expected an object")
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise CocoFormatError(f"{path}: missing or non-list '{key}'")
    if not isinstance(coco.get("annotations", []), list):
        raise CocoFormatError(f"{path}: 'annotations' is not a list")
    _check_categories(coco["categories"], path)
    return coco


def _check_categories(categories: list[Any], path: Path) -> None:
    # The label map is built from these: a broken category list cannot be dropped around.
    seen = set()
    for k, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise CocoFormatError(f"{path}: categories[{k}] needs an integer 'id' and a string 'name': {cat!r}")
        if cat["id"] in seen:
            raise CocoFormatError(f"{path}: duplicate category id {cat['id']}")
        seen.add(cat["id"])


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _image_problem(img: Any) -> str | None:
    if not isinstance(img, dict):
        return f"entry is {type(img).__name__}, not an object"
    if not _is_int(img.get("id")):
        return f"'id' is {img.get('id')!r}, not an integer"
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return f"'file_name' is {img.get('file_name')!r}"
    for key in ("width", "height"):
        if not _is_int(img.get(key)) or img[key] <= 0:
            return f"'{key}' is {img.get(key)!r}, not a positive integer"
    return None


def _annotation_problem(ann: Any) -> str | None:
    if not isinstance(ann, dict):
        return f"entry is {type(ann).__name__}, not an object"
    missing = [k for k in ANNOTATION_FIELDS if k not in ann]
    if missing:
        return f"missing field(s) {missing}"
    for key in ("id", "image_id", "category_id"):
        if not _is_int(ann[key]):
            return f"'{key}' is {ann[key]!r}, not an integer"
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return f"'bbox' is {bbox!r}, not 4 finite numbers"
    if ann["iscrowd"] not in (0, 1) or isinstance(ann["iscrowd"], bool):
        return f"'iscrowd' is {ann['iscrowd']!r}, not 0 or 1"
    if not _is_number(ann["area"]) or ann["area"] < 0:
        return f"'area' is {ann['area']!r}, not a finite number >= 0"
    return None


def _bbox_problem(bbox: list[float], width: int, height: int) -> tuple[str, str] | None:
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return BBOX_NON_POSITIVE, f"bbox {bbox} has width or height <= 0"
    tol = BBOX_TOLERANCE_PX
    sticks_out = x < -tol or y < -tol or x + w > width + tol or y + h > height + tol
    if sticks_out or x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return BBOX_OUTSIDE_IMAGE, f"bbox {bbox} (xywh) is outside the {width}x{height} image"
    return None


def _ids_seen_more_than_once(ids: Iterable[int]) -> set[int]:
    return {i for i, n in Counter(ids).items() if n > 1}


def validate_coco(coco: dict[str, Any]) -> tuple[list[ImageRecord], list[Issue]]:
    """Check the JSON structure, ids, categories and boxes (no file access).

    An id carried by two entries is ambiguous, so every entry carrying it is dropped.

    Args:
        coco: the parsed annotation file (see :func:`load_coco_json`).

    Returns:
        The kept images, in source order, each with its kept annotations in source order; and the
        issues, one per dropped image or annotation.
    """
    issues: list[Issue] = []
    images = coco["images"]
    dup_images = _ids_seen_more_than_once(img["id"] for img in images if _image_problem(img) is None)
    records: dict[int, ImageRecord] = {}
    dropped_images: set[Any] = set()
    for img in images:
        problem = _image_problem(img)
        image_id = img.get("id") if isinstance(img, dict) else None
        file_name = img.get("file_name") if isinstance(img, dict) else None
        if problem is None and image_id in dup_images:
            problem, reason = "the id is used by more than one image entry", DUPLICATE_IMAGE_ID
        else:
            reason = MALFORMED_IMAGE
        if problem is not None:
            issues.append(Issue(reason, image_id, None, file_name, problem))
            dropped_images.add(image_id if _is_int(image_id) else None)
            continue
        records[image_id] = ImageRecord(info=img)

    annotations = coco.get("annotations", [])
    dup_anns = _ids_seen_more_than_once(a["id"] for a in annotations if _annotation_problem(a) is None)
    category_ids = {cat["id"] for cat in coco["categories"]}
    for ann in annotations:
        problem = _annotation_problem(ann)
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        record = records.get(image_id) if _is_int(image_id) else None
        file_name = record.file_name if record is not None else None
        if problem is not None:
            issues.append(Issue(MALFORMED_ANNOTATION, image_id, ann_id, file_name, problem))
        elif ann_id in dup_anns:
            issues.append(Issue(DUPLICATE_ANNOTATION_ID, image_id, ann_id, file_name,
                                "the id is used by more than one annotation"))
        elif record is None and image_id in dropped_images:
            issues.append(Issue(IMAGE_DROPPED, image_id, ann_id, None, "its image entry was dropped"))
        elif record is None:
            issues.append(Issue(ANNOTATION_FOR_MISSING_IMAGE, image_id, ann_id, None,
                                "no image entry has this image_id"))
        elif ann["category_id"] not in category_ids:
            issues.append(Issue(UNKNOWN_CATEGORY, image_id, ann_id, file_name,
                                f"category_id {ann['category_id']} is not in 'categories'"))
        elif (bad := _bbox_problem(ann["bbox"], record.info["width"], record.info["height"])) is not None:
            issues.append(Issue(bad[0], image_id, ann_id, file_name, bad[1]))
        else:
            record.annotations.append(ann)
    return list(records.values()), issues


def drop_images(records: list[ImageRecord], image_issues: dict[int, Issue]) -> tuple[list[ImageRecord], list[Issue]]:
    """Remove images found bad (e.g. by the file check); their annotations are reported as dropped.

    Args:
        records: the images kept so far.
        image_issues: position in ``records`` -> the issue that drops that image.

    Returns:
        The remaining records and the issues (the image's own, then one per annotation it carried).
    """
    kept, issues = [], []
    for pos, record in enumerate(records):
        issue = image_issues.get(pos)
        if issue is None:
            kept.append(record)
            continue
        issues.append(issue)
        issues.extend(Issue(IMAGE_DROPPED, record.id, a["id"], record.file_name, f"image dropped: {issue.reason}")
                      for a in record.annotations)
    return kept, issues


def drop_empty_images(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[Issue]]:
    """Remove images without annotations, as COCO detection training usually does."""
    kept = [r for r in records if r.annotations]
    issues = [Issue(NO_ANNOTATIONS, r.id, None, r.file_name, "no annotations (--drop-empty)")
              for r in records if not r.annotations]
    return kept, issues


def count_reasons(issues: Iterable[Issue]) -> dict[str, int]:
    """Number of dropped items per reason, sorted by reason."""
    return dict(sorted(Counter(i.reason for i in issues).items()))


def format_reason_table(issues: list[Issue]) -> str:
    """A two-column text table: reason, count (and a total)."""
    counts = count_reasons(issues)
    if not counts:
        return "nothing dropped"
    width = max(len("reason"), *(len(r) for r in counts))
    lines = [f"{'reason':<{width}}  count", f"{'-' * width}  -----"]
    lines += [f"{reason:<{width}}  {n:5d}" for reason, n in counts.items()]
    lines.append(f"{'total':<{width}}  {sum(counts.values()):5d}")
    return "\n".join(lines)
