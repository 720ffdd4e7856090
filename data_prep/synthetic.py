"""A small but real COCO-format detection dataset: JPEG files plus an instances JSON.

    python -m data_prep.synthetic --out /tmp/synth --images 64 --size 128x96 --seed 0

Writes ``OUT/images/<id>.jpg`` and ``OUT/annotations/instances_<split>.json``. Five classes, each a
solid shape of its own color (easy for a small Faster R-CNN to learn in a few CPU minutes), on
textured grey backgrounds; sizes 15-50% of the image side with varied aspect ratios; a quarter of the
images are portrait; a few crowd boxes and empty images. Category ids are deliberately not contiguous
(1, 3, 7, 12, 90) so the id <-> label mapping is exercised, and image ids have gaps too.

``--hard`` (opt-in; the default output is unchanged byte for byte) writes a harder set for the
recipe sweep (benchmarks/recipe_sweep.py, issue 23): the default set is learnt too easily (mmAP 65.6
after the demo's 132 iterations) for differences between training recipes to show. Chosen before
any sweep result was seen, each change removes a shortcut the default set offers:

* **8 classes, some told apart by one cue only**: red_triangle has red_box's colour (only the shape
  differs); orange_box is close to red_box and teal_ellipse to green_ellipse in colour (only the hue
  differs, shapes are the same). Each object's colour is jittered (+-24 per channel), so colour is
  a cue, not a key.
* **Smaller objects**: 12-35% of the shorter side instead of 15-50%; at the sweep's 96x64 images that
  is 8-22 px, below the detector's smallest anchor (32 px).
* **More, overlapping objects**: 1-8 per image instead of 1-4, and one may cover up to 40% of
  another's box instead of 10% (the box stays the whole shape: partly hidden objects).
* **Clutter that is not an object**: up to 6 unannotated distractors per image, drawn behind the
  objects: outlines of class shapes in class colours, specks of class colour smaller than any
  object, lines, and filled shapes in dull colours. Filled class shapes are the objects; the rest
  must be learnt as background.

Empty images, crowd boxes, portrait images and the background are as in the default set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
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
# The hard variant's classes: the default five, plus one sharing a colour and two near in colour.
HARD_CLASSES = CLASSES + (
    (15, "red_triangle", (220, 30, 30), "triangle"),  # red_box's colour: only the shape tells them apart
    (21, "orange_box", (230, 110, 30), "box"),        # near red_box in colour, the same shape
    (44, "teal_ellipse", (30, 150, 130), "ellipse"),  # near green_ellipse in colour, the same shape
)
HARD_TAG = ", hard variant"  # in the annotation file's description
DULL_COLORS = ((120, 110, 100), (95, 105, 120), (140, 135, 120), (105, 120, 105))  # clutter fills
EMPTY_EVERY = 16  # image k has no objects when k % 16 == 5
CROWD_EVERY = 12  # image k gets one crowd box (a cluster of small objects) when k % 12 == 7
PORTRAIT_FRACTION = 0.25


@dataclass(frozen=True)
class Variant:
    """What a set's objects look like. DEFAULT reproduces the original set draw for draw: its zero
    clutter and jitter draw nothing from the random generator."""

    classes: tuple
    size_range: tuple[float, float]  # object side, as a fraction of the image's shorter side
    max_objects: int                 # 1 .. max_objects objects per (non-empty) image
    max_overlap: float               # intersection over the smaller box allowed between two objects
    clutter: int                     # up to this many unannotated distractors per image
    color_jitter: int                # +- this much per channel on each object's colour


DEFAULT = Variant(CLASSES, (0.15, 0.5), 4, 0.1, 0, 0)
HARD = Variant(HARD_CLASSES, (0.12, 0.35), 8, 0.4, 6, 24)


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
               hi: float, max_overlap: float = 0.1) -> tuple[float, ...] | None:
    side = min(width, height)
    for _ in range(20):
        scale = rng.uniform(lo, hi) * side
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        w, h = min(scale * math.sqrt(aspect), width - 2.0), min(scale / math.sqrt(aspect), height - 2.0)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = tuple(round(v, 2) for v in (x, y, w, h))
        if all(_overlap(box, t) < max_overlap for t in taken):
            return box
    return None


def _jitter(rng: np.random.Generator, color: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    if not amount:  # the default set: no draw from rng
        return color
    return tuple(int(v) for v in np.clip(np.asarray(color) + rng.integers(-amount, amount + 1, size=3), 0, 255))


def _draw_clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int,
                  variant: Variant) -> None:
    """Unannotated distractors (hard variant), drawn before the objects so that they lie behind them."""
    side = min(width, height)
    for _ in range(int(rng.integers(0, variant.clutter + 1))):
        kind = int(rng.integers(4))
        _, _, color, shape = variant.classes[int(rng.integers(len(variant.classes)))]
        if kind == 0:  # a class shape's outline in its colour: not filled, so not an object
            box = _place_box(rng, width, height, [], *variant.size_range)
            draw.polygon(_outline(shape, *box), outline=_jitter(rng, color, variant.color_jitter))
        elif kind == 1:  # a speck of class colour, smaller than any object
            s = rng.uniform(0.03, 0.5 * variant.size_range[0]) * side
            x, y = rng.uniform(0, width - s), rng.uniform(0, height - s)
            draw.rectangle((x, y, x + s, y + s), fill=color)
        elif kind == 2:  # a line across part of the image
            x0, x1 = rng.uniform(0, width, size=2)
            y0, y1 = rng.uniform(0, height, size=2)
            draw.line((x0, y0, x1, y1), fill=color, width=1)
        else:  # a filled class shape in a dull colour
            box = _place_box(rng, width, height, [], *variant.size_range)
            draw.polygon(_outline(shape, *box), fill=DULL_COLORS[int(rng.integers(len(DULL_COLORS)))])


def _draw_objects(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int, k: int,
                  image_id: int, ann_id: int, variant: Variant = DEFAULT) -> list[dict[str, Any]]:
    anns: list[dict[str, Any]] = []
    taken: list[tuple[float, ...]] = []
    classes = variant.classes
    num = 0 if k % EMPTY_EVERY == 5 else int(rng.integers(1, variant.max_objects + 1))
    for _ in range(num):
        box = _place_box(rng, width, height, taken, *variant.size_range, max_overlap=variant.max_overlap)
        if box is None:
            continue
        cat_id, _, color, shape = classes[int(rng.integers(len(classes)))]
        color = _jitter(rng, color, variant.color_jitter)
        poly = _outline(shape, *box)
        draw.polygon(poly, fill=color)
        taken.append(box)
        anns.append({"id": ann_id + len(anns), "image_id": image_id, "category_id": cat_id, "bbox": list(box),
                     "area": round(_polygon_area(poly), 2), "iscrowd": 0,
                     "segmentation": [[round(c, 2) for p in poly for c in p]]})
    if k % CROWD_EVERY == 7:
        box = _place_box(rng, width, height, taken, 0.25, 0.4)
        if box is not None:
            cat_id, _, color, shape = classes[int(rng.integers(len(classes)))]
            x, y, w, h = box
            for k in range(6):  # a cluster of small same-class objects inside the crowd box
                sx, sy = x + (k % 3) * w / 3, y + (k // 3) * h / 2
                draw.polygon(_outline(shape, sx + 1, sy + 1, w / 3 - 2, h / 2 - 2), fill=color)
            anns.append({"id": ann_id + len(anns), "image_id": image_id, "category_id": cat_id,
                         "bbox": list(box), "area": round(w * h, 2), "iscrowd": 1,
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    return anns


def make_synthetic_coco(out: str | Path, num_images: int, size: tuple[int, int], seed: int = 0,
                        split: str = "train", quality: int = 90, hard: bool = False) -> Path:
    """Write the dataset; return the annotation file's path.

    Args:
        out: output directory (``images/`` and ``annotations/`` are created in it).
        num_images: number of images.
        size: (width, height) of landscape images; portrait ones are (height, width).
        seed: everything (images and JSON) is a function of the arguments and this seed.
        hard: the harder variant (module docstring); False writes exactly the original set.
    """
    variant = HARD if hard else DEFAULT
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for k in range(num_images):
        image_id = 100 + 3 * k
        width, height = size if rng.random() >= PORTRAIT_FRACTION else size[::-1]
        im = _background(rng, width, height)
        draw = ImageDraw.Draw(im)
        if variant.clutter:
            _draw_clutter(rng, draw, width, height, variant)
        anns = _draw_objects(rng, draw, width, height, k, image_id, 1000 + 10 * k, variant)
        file_name = f"{image_id:012d}.jpg"
        im.save(out / "images" / file_name, quality=quality)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1})
        annotations += anns
    coco = {
        "info": {"description": f"hvd_megdet synthetic detection set{HARD_TAG if hard else ''} (seed {seed})",
                 "version": "1.0"},
        "licenses": [{"id": 1, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _, _ in variant.classes],
    }
    path = out / "annotations" / f"instances_{split}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(coco), encoding="utf-8")
    os.replace(tmp, path)
    return path


def make_shards(out: str | Path, num_images: int, size: str, seed: int, split: str = "train",
                images_per_shard: int = 8) -> Path:
    """A synthetic split packed into shards, by the two commands a user runs (``python -m
    data_prep.synthetic``, then ``python -m data_prep.coco_to_hdf5``): ``OUT/raw``, then
    ``OUT/shards/<split>``, which it returns. For the tests and benchmarks."""
    raw, shards = Path(out).resolve() / "raw", Path(out).resolve() / "shards" / split
    here = Path(__file__).resolve().parent.parent  # where `-m data_prep` is found, installed or not
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(raw), "--images", str(num_images),
                    "--size", size, "--seed", str(seed), "--split", split], check=True, cwd=here, capture_output=True)
    subprocess.run([sys.executable, "-m", "data_prep.coco_to_hdf5", "--images", str(raw / "images"),
                    "--annotations", str(raw / "annotations" / f"instances_{split}.json"), "--out", str(shards),
                    "--images-per-shard", str(images_per_shard)], check=True, cwd=here, capture_output=True)
    return shards


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
    parser.add_argument("--hard", action="store_true",
                        help="the harder variant: 8 classes, small overlapping objects, clutter (module docstring)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    path = make_synthetic_coco(args.out, args.images, args.size, args.seed, args.split, hard=args.hard)
    coco: dict[str, Any] = json.loads(path.read_text())
    print(f"wrote {len(coco['images'])} images and {len(coco['annotations'])} annotations: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
