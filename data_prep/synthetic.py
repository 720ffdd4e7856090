"""A small but real COCO-format detection dataset: JPEG files plus an instances JSON.

    python -m data_prep.synthetic --out /tmp/synth --images 64 --size 128x96 --seed 0

Writes ``OUT/images/<id>.jpg`` and ``OUT/annotations/instances_<split>.json``. Five classes, each a
solid shape of its own color (easy for a small Faster R-CNN to learn in a few CPU minutes), on
textured grey backgrounds; sizes 15-50% of the image side with varied aspect ratios; a quarter of the
images are portrait; a few crowd boxes and empty images. Category ids are deliberately not contiguous
(1, 3, 7, 12, 90) so the id <-> label mapping is exercised, and image ids have gaps too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

# (category id, name, RGB color, shape)
CLASSES = (
    (1, "red_box", (220, 30, 30), "box"),
    (3, "green_ellipse", (30, 170, 40), "ellipse"),
    (7, "blue_triangle", (30, 60, 220), "triangle"),
    (12, "yellow_diamond", (235, 215, 25), "diamond"),
    (90, "magenta_cross", (200, 40, 200), "cross"),
)
EMPTY_EVERY = 16  # image k has no objects when k % 16 == 5
CROWD_EVERY = 12  # image k gets one crowd box (a cluster of small objects) when k % 12 == 7
PORTRAIT_FRACTION = 0.25


def _outline(shape: str, x: float, y: float, w: float, h: float) -> list[tuple[float, float]]:
    """The polygon of a shape filling the box (x, y, w, h); also its COCO segmentation."""
    if shape == "box":
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    if shape == "triangle":
        return [(x + w / 2, y), (x + w, y + h), (x, y + h)]
    if shape == "diamond":
        return [(x + w / 2, y), (x + w, y + h / 2), (x + w / 2, y + h), (x, y + h / 2)]
    if shape == "cross":
        a, b = w / 3, h / 3
        return [(x + a, y), (x + 2 * a, y), (x + 2 * a, y + b), (x + w, y + b), (x + w, y + 2 * b),
                (x + 2 * a, y + 2 * b), (x + 2 * a, y + h), (x + a, y + h), (x + a, y + 2 * b),
                (x, y + 2 * b), (x, y + b), (x + a, y + b)]
    cx, cy = x + w / 2, y + h / 2  # ellipse, as a 24-gon
    return [(cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t))
            for t in (2 * math.pi * k / 24 for k in range(24))]


def _polygon_area(points: list[tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Low-saturation blotches plus fine noise: texture to ignore, colors that never match a class.
    grey = rng.integers(70, 180)
    coarse = rng.integers(-35, 36, size=(height // 16 + 2, width // 16 + 2, 1)) + rng.integers(-12, 13, size=3)
    coarse = Image.fromarray(np.clip(grey + coarse, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    fine = rng.integers(-12, 13, size=(height, width, 1))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int64) + fine, 0, 255).astype(np.uint8))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area: objects may touch but barely hide each other."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def _place_box(rng: np.random.Generator, width: int, height: int, taken: list[tuple[float, ...]], lo: float,
               hi: float) -> tuple[float, ...] | None:
    side = min(width, height)
    for _ in range(20):
        scale = rng.uniform(lo, hi) * side
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        w, h = min(scale * math.sqrt(aspect), width - 2.0), min(scale / math.sqrt(aspect), height - 2.0)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = tuple(round(v, 2) for v in (x, y, w, h))
        if all(_overlap(box, t) < 0.1 for t in taken):
            return box
    return None


def _draw_objects(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int, k: int,
                  image_id: int, ann_id: int) -> list[dict[str, Any]]:
    anns: list[dict[str, Any]] = []
    taken: list[tuple[float, ...]] = []
    num = 0 if k % EMPTY_EVERY == 5 else int(rng.integers(1, 5))
    for _ in range(num):
        box = _place_box(rng, width, height, taken, 0.15, 0.5)
        if box is None:
            continue
        cat_id, _, color, shape = CLASSES[int(rng.integers(len(CLASSES)))]
        poly = _outline(shape, *box)
        draw.polygon(poly, fill=color)
        taken.append(box)
        anns.append({"id": ann_id + len(anns), "image_id": image_id, "category_id": cat_id, "bbox": list(box),
                     "area": round(_polygon_area(poly), 2), "iscrowd": 0,
                     "segmentation": [[round(c, 2) for p in poly for c in p]]})
    if k % CROWD_EVERY == 7:
        box = _place_box(rng, width, height, taken, 0.25, 0.4)
        if box is not None:
            cat_id, _, color, shape = CLASSES[int(rng.integers(len(CLASSES)))]
            x, y, w, h = box
            for k in range(6):  # a cluster of small same-class objects inside the crowd box
                sx, sy = x + (k % 3) * w / 3, y + (k // 3) * h / 2
                draw.polygon(_outline(shape, sx + 1, sy + 1, w / 3 - 2, h / 2 - 2), fill=color)
            anns.append({"id": ann_id + len(anns), "image_id": image_id, "category_id": cat_id,
                         "bbox": list(box), "area": round(w * h, 2), "iscrowd": 1,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    return anns


def make_synthetic_coco(out: str | Path, num_images: int, size: tuple[int, int], seed: int = 0,
                        split: str = "train", quality: int = 90) -> Path:
    """Write the dataset; return the annotation file's path.

    Args:
        out: output directory (``images/`` and ``annotations/`` are created in it).
        num_images: number of images.
        size: (width, height) of landscape images; portrait ones are (height, width).
        seed: everything (images and JSON) is a function of the arguments and this seed.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for k in range(num_images):
        image_id = 100 + 3 * k
        width, height = size if rng.random() >= PORTRAIT_FRACTION else size[::-1]
        im = _background(rng, width, height)
        anns = _draw_objects(rng, ImageDraw.Draw(im), width, height, k, image_id, 1000 + 10 * k)
        file_name = f"{image_id:012d}.jpg"
        im.save(out / "images" / file_name, quality=quality)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1})
        annotations += anns
    coco = {
        "info": {"description": f"hvd_megdet synthetic detection set (seed {seed})", "version": "1.0"},
        "licenses": [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _, _ in CLASSES],
    }
    path = out / "annotations" / f"instances_{split}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(coco), encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> (640, 480)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {text!r}")
    return w, h


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthetic", description="Write a synthetic COCO-format detection dataset.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--images", type=int, default=64, help="number of images")
    parser.add_argument("--size", type=parse_size, default=(128, 96), help="WxH of landscape images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="annotations/instances_<split>.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    path = make_synthetic_coco(args.out, args.images, args.size, args.seed, args.split)
    coco: dict[str, Any] = json.loads(path.read_text())
    print(f"wrote {len(coco['images'])} images and {len(coco['annotations'])} annotations: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
