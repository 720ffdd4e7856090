"""COCO bbox evaluation on every rank, scored on rank 0 with pycocotools.

The paper's figure of merit is COCO mmAP (AP@[.5:.95]) and mmAR (AR@100) on val2017 (MegDet,
arXiv 1711.07240, Sec. 4). :func:`evaluate` splits the split into contiguous, disjoint shares, one per
rank (:func:`hvd_megdet.ranks.split`, never padded, so no image is scored twice), maps each detection back
to original-image coordinates and COCO category ids (:func:`detections_to_coco`), gathers them to
rank 0 and scores them with ``COCOeval`` (:func:`coco_metrics`). Metrics are fractions in [0, 1]
exactly as pycocotools reports them (the paper prints them x100); -1 means "no ground truth in this
area range", again as pycocotools has it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hvd_megdet import comm
from hvd_megdet.fileio import atomic_write
from hvd_megdet.metrics import progress_bar
from hvd_megdet.ranks import split

logger = logging.getLogger(__name__)

# Names of COCOeval.stats[i]; stats 6 and 7 (AR@1, AR@10) are not reported.
METRIC_NAMES = {"mmAP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5,
                "mmAR": 8, "ARs": 9, "ARm": 10, "ARl": 11}


def box_scale(orig_size: Sequence[int] | torch.Tensor, size: Sequence[int] | torch.Tensor) -> tuple[float, float]:
    """``(sx, sy)`` that take boxes from an image of ``size`` back to ``orig_size`` (both ``[h, w]``)."""
    (oh, ow), (h, w) = (float(v) for v in orig_size), (float(v) for v in size)
    if min(oh, ow, h, w) <= 0:
        raise ValueError(f"image sizes must be positive, got orig_size={list(orig_size)}, size={list(size)}")
    return ow / w, oh / h


def detections_to_coco(
    image_id: int,
    boxes_xyxy: Any,
    scores: Any,
    labels: Any,
    label_to_category_id: Sequence[int],
    scale: tuple[float, float] = (1.0, 1.0),
) -> list[dict]:
    """Turn one image's detections into COCO result dicts.

    Args:
        image_id: the COCO image id.
        boxes_xyxy: ``[N, 4]`` boxes (x1, y1, x2, y2) in the coordinates of the model's input image
            (tensor on CPU, array or nested list).
        scores, labels: ``[N]`` confidences and contiguous labels ``1..K``.
        label_to_category_id: ``label_to_category_id[label]`` is the COCO category id (index 0 is
            background, which a detector never outputs).
        scale: ``(sx, sy)`` from the input image to the original one, see :func:`box_scale`.

    Returns:
        ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per detection, plain Python
        numbers in original-image pixels.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    bad = [int(l) for l in labels if not 1 <= int(l) < len(label_to_category_id)]
    if bad:
        raise ValueError(f"image {image_id}: labels {sorted(set(bad))} outside 1..{len(label_to_category_id) - 1}")
    sx, sy = float(scale[0]), float(scale[1])
    boxes = boxes * np.array([sx, sy, sx, sy])
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return [
        {"image_id": int(image_id), "category_id": int(label_to_category_id[int(label)]),
         "bbox": [float(v) for v in box], "score": float(score)}
        for box, score, label in zip(xywh, scores, labels)
    ]


def _write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_write(path, "w") as f:
        json.dump(obj, f)
    return Path(path)


def write_results_json(path: str | os.PathLike, detections: list[dict]) -> Path:
    """Write ``detections`` as a standard COCO results file (a JSON list), atomically."""
    return _write_json_atomic(path, list(detections))


def _load_gt(gt: str | os.PathLike | dict | COCO) -> COCO:
    if isinstance(gt, COCO):
        return gt
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints "creating index..."
        coco = COCO()
    if isinstance(gt, dict):
        coco.dataset = copy.deepcopy(gt)
    else:
        with open(gt) as f:
            coco.dataset = json.load(f)
    missing = [k for k in ("images", "annotations", "categories") if k not in coco.dataset]
    if missing:
        raise ValueError(f"ground truth {gt if not isinstance(gt, dict) else '(dict)'} lacks {missing}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_detections(coco: COCO, detections: list[dict]) -> None:
    image_ids, category_ids = set(coco.getImgIds()), set(coco.getCatIds())
    for i, det in enumerate(detections):
        missing = {"image_id", "category_id", "bbox", "score"} - det.keys()
        if missing:
            raise ValueError(f"detection {i} lacks {sorted(missing)}: {det}")
        if det["image_id"] not in image_ids:
            raise ValueError(f"detection {i} is for image id {det['image_id']}, which the ground truth lacks")
        if det["category_id"] not in category_ids:
            raise ValueError(f"detection {i} (image id {det['image_id']}) has category id "
                             f"{det['category_id']}, which the ground truth lacks")
        if len(det["bbox"]) != 4 or not all(math.isfinite(v) for v in [*det["bbox"], det["score"]]):
            raise ValueError(f"detection {i} (image id {det['image_id']}) has a bad bbox or score: {det}")


def coco_metrics(gt: str | os.PathLike | dict | COCO, detections: list[dict]) -> dict[str, float]:
    """Score COCO bbox results exactly as pycocotools' ``COCOeval`` does.

    Args:
        gt: ground truth as an annotation file path, a COCO-format dict or a pycocotools ``COCO``.
        detections: COCO result dicts (image_id, category_id, bbox [x, y, w, h], score); not modified.

    Returns:
        mmAP, AP50, AP75, APs, APm, APl, mmAR (AR@100), ARs, ARm, ARl. With no detections at all
        every value is 0.0 (pycocotools itself cannot load an empty result list).
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # pycocotools prints its progress; keep it in the log
        coco_gt = _load_gt(gt)
        _check_detections(coco_gt, detections)
        if not detections:
            logger.warning("no detections at all: every COCO metric is 0")
            return {name: 0.0 for name in METRIC_NAMES}
        # loadRes adds keys to the dicts it is given, so it gets copies.
        coco_dt = coco_gt.loadRes([dict(d, bbox=list(d["bbox"])) for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("pycocotools output:\n%s", out.getvalue())
    return {name: float(evaluator.stats[i]) for name, i in METRIC_NAMES.items()}


def _collate(batch: list) -> tuple:
    return tuple(zip(*batch))


def _check_coverage(seen_ids: list[int], gt_ids: set[int] | None) -> None:
    repeated = sorted(i for i, n in Counter(seen_ids).items() if n > 1)
    if repeated:
        raise RuntimeError(f"evaluation saw image ids {repeated[:10]} more than once")
    if gt_ids is None:
        return
    missing, extra = sorted(gt_ids - set(seen_ids)), sorted(set(seen_ids) - gt_ids)
    if missing or extra:
        raise RuntimeError(f"evaluated images differ from the ground truth: {len(missing)} ground-truth "
                           f"images never evaluated (e.g. {missing[:10]}), {len(extra)} evaluated images "
                           f"not in the ground truth (e.g. {extra[:10]})")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    ctx: comm.DistContext,
    *,
    device: torch.device | str,
    batch_size: int = 1,
    gt: str | os.PathLike | dict | COCO | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, float] | None:
    """Run ``model`` over ``dataset`` on all ranks and score the detections on rank 0.

    Args:
        model: a torchvision-style detector: ``model(list_of_images)`` returns one dict per image
            with ``boxes`` (xyxy in that image's coordinates), ``scores`` and ``labels``. It is put
            in eval mode and given back in the mode it came in.
        dataset: ``ds[i] -> (image, target)`` with target ``image_id``, ``orig_size`` and ``size``;
            ``ds.label_to_category_id`` and ``ds.coco_gt()``.
        ctx: the distributed context; every rank must call this.
        device: where the model runs.
        batch_size: images per forward pass on each rank.
        gt: ground truth (annotation file path, COCO dict or ``COCO``); default ``dataset.coco_gt()``.
        output_dir: rank 0 writes ``detections.json`` and ``metrics.json`` here if given.
        progress: show a progress bar on rank 0.
        num_workers: DataLoader worker processes per rank.

    Returns:
        The :func:`coco_metrics` dict on rank 0, None on the other ranks.

    Raises:
        RuntimeError: if any image was evaluated twice, or the evaluated images are not exactly
            the ground truth's images (the scores would not be COCO's).
    """
    indices = list(split(len(dataset), ctx.rank, ctx.size))
    # Its own generator: the loader's worker seeds must not be drawn from the global RNG, which
    # training continues from (a resumed run would otherwise sample proposals differently).
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, collate_fn=_collate,
                                         generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    local_dets: list[dict] = []
    local_ids: list[int] = []
    try:
        with progress_bar(len(indices), desc="eval", unit="img", enabled=progress and ctx.is_main) as bar:
            for images, targets in loader:
                outputs = model([img.to(device) for img in images])
                for out, target in zip(outputs, targets, strict=True):
                    image_id = int(target["image_id"])
                    local_ids.append(image_id)
                    local_dets += detections_to_coco(
                        image_id, out["boxes"].cpu(), out["scores"].cpu(), out["labels"].cpu(),
                        dataset.label_to_category_id, box_scale(target["orig_size"], target["size"]))
                bar.update(len(images))
    finally:
        model.train(was_training)
    # dist(world): every rank's image ids and detections, in rank order, on every rank.
    gathered = comm.allgather_object((local_ids, local_dets), ctx)
    infer_s = time.perf_counter() - start
    seen_ids = [i for ids, _ in gathered for i in ids]
    _check_coverage(seen_ids, None)  # on every rank, so that all of them stop together
    if not ctx.is_main:
        return None

    detections = [d for _, dets in gathered for d in dets]
    coco_gt = _load_gt(dataset.coco_gt() if gt is None else gt)
    _check_coverage(seen_ids, set(coco_gt.getImgIds()))
    metrics = coco_metrics(coco_gt, detections)
    logger.info("evaluated %d images on %d ranks (%d detections; inference %.1fs, scoring %.1fs): "
                "mmAP %.4f mmAR %.4f", len(seen_ids), ctx.size, len(detections), infer_s,
                time.perf_counter() - start - infer_s, metrics["mmAP"], metrics["mmAR"])
    if output_dir is not None:
        write_results_json(Path(output_dir) / "detections.json", detections)
        _write_json_atomic(Path(output_dir) / "metrics.json", metrics)
    return metrics
