"""Check that an image file exists, decodes, and has the size its JSON entry claims.

A full decode is the only way to find a truncated JPEG, but decoding at 1/8 scale (libjpeg's DCT
scaling, ``Image.draft``) still walks the whole entropy-coded stream at a fraction of the cost. The
check also records the byte count and CRC-32 of the file, which go into the shard's plan hash, so a
rerun can tell that a finished shard still matches its sources.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data_prep.coco_records import (CORRUPT_IMAGE_FILE, IMAGE_SIZE_MISMATCH, MISSING_IMAGE_FILE, ImageRecord,
                                    Issue)


@dataclass(frozen=True)
class ImageFacts:
    """What packing needs to know about one good image file."""

    format: str
    num_bytes: int
    crc32: int


def image_path(images_dir: str | Path, file_name: str) -> Path:
    """Where ``file_name`` (which may hold a sub-path such as ``train2017/xyz.jpg``) lives."""
    return Path(images_dir) / file_name


def inspect_image_bytes(data: bytes) -> tuple[str, int, int]:
    """Decode ``data`` (reduced scale for JPEG) and return its (format, width, height).

    Raises:
        OSError, ValueError, Image.DecompressionBombError: unreadable or truncated image data.
    """
    with Image.open(io.BytesIO(data)) as im:
        fmt, (width, height) = im.format, im.size
        # draft() only affects JPEG; other formats decode at full size.
        im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        im.load()
    return fmt, width, height


def check_image_file(images_dir: str | Path, record: ImageRecord) -> ImageFacts | Issue:
    """Read and decode one image; return its facts, or the issue that drops it."""
    path = image_path(images_dir, record.file_name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Issue(MISSING_IMAGE_FILE, record.id, None, record.file_name, f"{path} does not exist")
    except OSError as e:
        return Issue(MISSING_IMAGE_FILE, record.id, None, record.file_name, f"cannot read {path}: {e}")
    try:
        fmt, width, height = inspect_image_bytes(data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return Issue(CORRUPT_IMAGE_FILE, record.id, None, record.file_name,
                     f"cannot decode {path}: {type(e).__name__}: {e}")
    if (width, height) != (record.info["width"], record.info["height"]):
        return Issue(IMAGE_SIZE_MISMATCH, record.id, None, record.file_name,
                     f"file is {width}x{height}, the JSON says {record.info['width']}x{record.info['height']}")
    return ImageFacts(format=fmt, num_bytes=len(data), crc32=zlib.crc32(data))
