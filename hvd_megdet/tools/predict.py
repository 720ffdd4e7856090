"""Draw a trained detector's detections on images, and write them as COCO results.

    python -m hvd_megdet.tools.predict --checkpoint runs/demo/checkpoints/ckpt_00000132.pt \\
        --shards data/synthetic/shards/val --out runs/demo/predictions
    python -m hvd_megdet.tools.predict --checkpoint C --images photos/ extra.jpg --out predictions --score-thresh 0.3
    horovodrun -np 8 -H node1:8 python -m hvd_megdet.tools.predict --checkpoint C --shards data/coco/shards/val2017 \\
        --out predictions --device cuda --batch-size 4

Writes to ``--out``: ``images/<name>.jpg`` (or ``--format png``), each image with its detections of
score >= ``--score-thresh`` drawn (box, class name, score); ``detections.json``, the same detections
as a COCO results list (image_id, category_id, bbox [x, y, w, h] in the image's pixels, score);
``images.json``, the COCO "images" and "categories" those ids refer to. Under a launcher the images
are split over the ranks (contiguous shares); rank 0 writes the two JSON files.

Class names come from the checkpoint's training data (``data.train_path`` in its config), or from
``--categories``: a COCO annotation file or a shard directory with the same categories. Image ids:
a shard's own ids; for files, the file name when every name is a number (COCO's 000000397133.jpg is
397133), else the position in the sorted list, from 1. The detector resizes each image itself
(``data.min_size``/``max_size`` of the run) and reports boxes in the image's own pixels.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from hvd_megdet import checkpoint, comm
from hvd_megdet.config import Config, from_dict
from hvd_megdet.errors import UserError
from hvd_megdet.fileio import atomic_path, atomic_write
from hvd_megdet.metrics import progress_bar, setup_console_logging
from hvd_megdet.model import build_model
from hvd_megdet.ranks import split

log = logging.getLogger("hvd_megdet.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CLS_SCORE_KEY = "roi_heads.box_predictor.cls_score.weight"  # rows: classes + background
# Distinct, readable box colours (Tableau 10 and a few more), picked by label.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")


class PredictError(UserError):
    """A rank could not finish its images (a write failed, memory ran out); names the rank."""


@dataclass
class Detector:
    """A trained model in eval mode and what its labels mean.

    Attributes:
        model: torchvision FasterRCNN (hvd_megdet's norm layers), eval mode, on the CPU.
        categories: ``{"id", "name", ...}`` in label order: label ``i`` is ``categories[i - 1]``.
        config: the training run's config.
    """

    model: torch.nn.Module
    categories: list[dict[str, Any]]
    config: Config


def read_categories(source: str | Path) -> list[dict[str, Any]]:
    """Categories sorted by id (the training labels' order) from a COCO json or a shard directory."""
    path = Path(source)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (categories)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
    categories = raw.get("categories") if isinstance(raw, dict) else None
    if not categories or not all(isinstance(c, dict) and "id" in c and "name" in c for c in categories):
        raise ValueError(f"{path}: no 'categories' list of {{id, name}} (a COCO annotation file or manifest.json?)")
    return sorted(categories, key=lambda c: c["id"])


def load_detector(checkpoint_path: str | Path, categories: str | Path | None = None) -> Detector:
    """Rebuild the trained model of ``checkpoint_path`` (written by hvd_megdet.train) for inference.

    Args:
        checkpoint_path: a checkpoint with "model" (state dict) and "config" (to_dict form).
        categories: where the class names come from (see :func:`read_categories`); default: the
            checkpoint's own "categories" if it has them, else its training shards.

    Raises:
        FileNotFoundError, ValueError: naming the checkpoint or the categories file.
    """
    state = checkpoint.load_checkpoint(checkpoint_path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{checkpoint_path}: no 'model' and 'config' entries (not written by hvd_megdet.train?)")
    cfg = from_dict(state["config"])
    if categories is not None:
        cats = read_categories(categories)
    elif state.get("categories"):
        cats = sorted(state["categories"], key=lambda c: c["id"])
    else:
        try:
            cats = read_categories(cfg.data.train_path)
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(f"{checkpoint_path}: class names come from its training data, but {err}; "
                                    f"pass --categories with the COCO annotation file or shards it was "
                                    f"trained on") from None
    weights = state["model"]
    num_classes = weights[CLS_SCORE_KEY].shape[0] if CLS_SCORE_KEY in weights else None
    if num_classes != len(cats) + 1:
        raise ValueError(f"{checkpoint_path}: the model has {num_classes} classes (with background) but the "
                         f"categories name {len(cats)}; pass --categories of its training data")
    # The checkpoint holds every weight: no backbone file is read (it may not exist here). A world
    # of one: CGBN layers in eval mode use their running statistics and communicate nothing.
    model_cfg = dataclasses.replace(cfg.model, backbone_weights="")
    model = build_model(model_cfg, comm.DistContext(), num_classes,
                        min_size=cfg.data.min_size, max_size=cfg.data.max_size)
    model.load_state_dict(weights)
    model.eval()
    return Detector(model=model, categories=list(cats), config=cfg)


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One input image: where it comes from, its COCO id, and the stem of its drawn file."""

    image_id: int
    name: str
    file: str | None = None       # a file on disk
    shard_index: int | None = None  # an index into the shard dataset


def list_image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, or found (non-recursively) in named directories, sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return found


def file_items(files: Sequence[Path]) -> list[Item]:
    """Items for image files; ids from the names if all are distinct numbers, else positions from 1."""
    stems = [f.stem for f in files]
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise ValueError(f"{seen[f.stem]} and {f} would both be drawn to {f.stem}.*: rename one")
        seen[f.stem] = f
    numeric = all(s.isdigit() for s in stems)
    return [Item(image_id=int(f.stem) if numeric else i, name=f.stem, file=str(f))
            for i, f in enumerate(files, start=1)]


def shard_items(dataset: Any) -> list[Item]:
    """Items for a shard dataset, named after the images' original file names (metadata only is read)."""
    file_names = {im["id"]: im.get("file_name", "") for im in dataset.coco_gt()["images"]}
    stems = [Path(file_names.get(i, "")).stem for i in dataset.image_ids]
    if len(set(stems)) < len(stems) or not all(stems):  # not usable as names: the ids are
        stems = [f"{int(i):012d}" for i in dataset.image_ids]
    return [Item(image_id=int(i), name=stem, shard_index=index)
            for index, (i, stem) in enumerate(zip(dataset.image_ids, stems))]


def _load_image(item: Item, dataset: Any) -> Image.Image:
    if item.file is not None:
        with Image.open(item.file) as im:
            return im.convert("RGB")
    data, _, _ = dataset.read_record(item.shard_index)
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------
def draw_detections(image: Image.Image, detections: Sequence[dict], names: dict[int, str]) -> Image.Image:
    """A copy of ``image`` with each COCO result (bbox xywh) drawn as a box with "name score"."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, round(min(out.size) / 40)))
    width = max(1, round(min(out.size) / 250))
    ordered_ids = sorted(names)
    for det in sorted(detections, key=lambda d: d["score"]):  # the best drawn last, on top
        x, y, w, h = det["bbox"]
        color = PALETTE[ordered_ids.index(det["category_id"]) % len(PALETTE)]
        draw.rectangle([x, y, x + w, y + h], outline=color, width=width)
        text = f"{names.get(det['category_id'], det['category_id'])} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 2
        ty = y - th if y - th >= 0 else y  # above the box, else inside it
        tx = max(0.0, min(x, out.width - tw))  # kept inside the image at the right edge
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        draw.text((tx + 2 - left, ty + 1 - top), text, fill="white", font=font)
    return out


def _save_image(image: Image.Image, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        if fmt == "jpg":
            image.save(tmp, format="JPEG", quality=90)
        else:
            image.save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(detector: Detector, items: Sequence[Item], ctx: comm.DistContext, out_dir: str | Path, *,
            dataset: Any = None, device: torch.device | str = "cpu", batch_size: int = 1,
            score_thresh: float = 0.5, fmt: str = "jpg") -> dict[str, Any] | None:
    """Detect, draw and (rank 0) write the results of ``items``; every rank must call this.

    Each rank takes its contiguous share of ``items`` (:func:`hvd_megdet.ranks.split`) and draws
    those images; the detections are gathered to rank 0, which writes detections.json and images.json.

    Returns:
        On rank 0: {"images", "detections", "failed": [(name, error)]}; None on other ranks.
    """
    out = Path(out_dir)
    label_to_id = [c["id"] for c in detector.categories]
    names = {c["id"]: c["name"] for c in detector.categories}
    model = detector.model.to(device).eval()
    # torchvision filters by score before NMS; for thresholds >= its default 0.05 that keeps exactly
    # the boxes NMS-then-threshold would, and below it, boxes the default would have dropped.
    model.roi_heads.score_thresh = score_thresh
    mine = [items[i] for i in split(len(items), ctx.rank, ctx.size)]
    images_json, detections, failed, error = [], [], [], None
    try:
        with progress_bar(len(mine), desc="predict", unit="img", enabled=ctx.is_main) as bar:
            for begin in range(0, len(mine), batch_size):
                batch, pictures = [], []
                for item in mine[begin:begin + batch_size]:
                    try:
                        pictures.append(_load_image(item, dataset))
                        batch.append(item)
                    except (OSError, ValueError) as err:  # unreadable or truncated: name it, go on
                        log.warning("rank %d: %s: cannot read image (%s); skipped", ctx.rank,
                                    item.file or item.name, err)
                        failed.append((item.file or item.name, str(err)))
                tensors = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float().div_(255).to(device)
                           for p in pictures]
                outputs = model(tensors) if tensors else []
                for item, picture, output in zip(batch, pictures, outputs, strict=True):
                    dets = _to_coco(item.image_id, output, label_to_id)
                    detections += dets
                    images_json.append({"id": item.image_id, "file_name": f"{item.name}.{fmt}",
                                        "width": picture.width, "height": picture.height,
                                        "source": item.file or f"shard index {item.shard_index}"})
                    _save_image(draw_detections(picture, dets, names), out / "images" / f"{item.name}.{fmt}", fmt)
                bar.update(len(mine[begin:begin + batch_size]))
    except Exception as err:  # noqa: BLE001 - a full disk, out of memory: the other ranks must not wait forever
        error = f"rank {ctx.rank}: {err}"
    # dist(world): every rank's images, detections and failures, in rank order (so in item order).
    gathered = comm.allgather_object((images_json, detections, failed, error), ctx, name="predict_results")
    errors = [g[3] for g in gathered if g[3]]
    if errors:  # every rank stops, with the first rank's reason
        raise PredictError(errors[0] + (f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""))
    if not ctx.is_main:
        return None
    result = {"images": [i for g in gathered for i in g[0]], "detections": [d for g in gathered for d in g[1]],
              "failed": [f for g in gathered for f in g[2]]}
    with atomic_write(out / "detections.json") as f:
        json.dump(result["detections"], f)
    with atomic_write(out / "images.json") as f:
        json.dump({"images": result["images"], "categories": detector.categories}, f, indent=1)
    return result


def _to_coco(image_id: int, output: dict[str, torch.Tensor], label_to_id: Sequence[int]) -> list[dict]:
    boxes = output["boxes"].cpu().double().numpy().reshape(-1, 4)
    return [{"image_id": image_id, "category_id": int(label_to_id[int(label) - 1]),
             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)}
            for (x1, y1, x2, y2), score, label in zip(boxes, output["scores"].cpu().tolist(),
                                                       output["labels"].cpu().tolist())]


def pick_device(choice: str, ctx: comm.DistContext) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is visible")
        return torch.device("cuda", ctx.device_index % torch.cuda.device_count())  # one GPU per rank
    return torch.device("cpu")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by hvd_megdet.train")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="DIR|FILE", help="image files, or directories of them")
    source.add_argument("--shards", metavar="DIR", help="a shard directory (data_prep.coco_to_hdf5)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--categories", default=None,
                        help="COCO json or shard directory with the class names (default: the training data)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass on each rank")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="drawn image files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1 or not 0.0 <= args.score_thresh <= 1.0:
        print("error: --batch-size must be >= 1 and --score-thresh in [0, 1]", file=sys.stderr)
        return 2
    ctx = comm.init()
    setup_console_logging(ctx.is_main)
    try:
        detector = load_detector(args.checkpoint, args.categories)
        dataset = None
        if args.shards:
            from hvd_megdet.data import ShardedCocoDataset

            dataset = ShardedCocoDataset(args.shards)
            items = shard_items(dataset)
        else:
            items = file_items(list_image_files(args.images))
        device = pick_device(args.device, ctx)
    except (OSError, ValueError, RuntimeError) as err:  # every rank fails the same way: no collective yet
        if ctx.is_main:
            print(f"error: {err}", file=sys.stderr)
        comm.shutdown(ctx)
        return 2
    try:
        result = predict(detector, items, ctx, args.out, dataset=dataset, device=device,
                         batch_size=args.batch_size, score_thresh=args.score_thresh, fmt=args.format)
    except PredictError as err:  # raised on every rank after the results were gathered
        if ctx.is_main:
            print(f"error: {err}", file=sys.stderr)
        comm.shutdown(ctx)
        return 1
    if ctx.is_main:
        print(f"{len(result['detections'])} detections (score >= {args.score_thresh}) on {len(result['images'])} "
              f"images, {ctx.size} rank(s): {Path(args.out) / 'images'}/, {Path(args.out) / 'detections.json'}, "
              f"{Path(args.out) / 'images.json'}")
        if result["failed"]:
            print(f"error: {len(result['failed'])} image(s) could not be read: "
                  + ", ".join(name for name, _ in result["failed"][:10]), file=sys.stderr)
    failed = bool(result["failed"]) if ctx.is_main else False
    comm.barrier(ctx)
    comm.shutdown(ctx)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
