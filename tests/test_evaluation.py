"""hvd_megdet.evaluation against pycocotools run directly, on a tiny synthetic COCO split.

The fake dataset and detector below follow the interfaces evaluation relies on: ``ds[i] -> (image,
target)`` with image_id / orig_size / size, ``ds.label_to_category_id``, ``ds.coco_gt()``, and a
torchvision-style ``model(list_of_images) -> [{"boxes", "scores", "labels"}]``. The detector reads
which image it was given from the pixel values and returns that image's ground truth (optionally
jittered, plus a false positive), so every number is checkable.
"""
import contextlib
import copy
import io
import json
import os

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hvd_megdet import comm
from hvd_megdet.evaluation import (box_scale, coco_metrics, detections_to_coco, evaluate,
                                   write_results_json)
from tests.mpirun import run_ranks

# The 80 COCO category ids: 1..90 with gaps.
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
LABEL_TO_CATEGORY_ID = [0] + COCO_IDS  # label 0 is background
# Order of COCOeval.summarize(): AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl.
STAT_INDEX = {"mmAP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5,
              "mmAR": 8, "ARs": 9, "ARm": 10, "ARl": 11}
# (original [h, w], model input [h, w]); sx != sy in some, so swapped axes would show.
SIZES = [((480, 640), (60, 80)), ((400, 300), (100, 50)), ((512, 512), (64, 64)), ((300, 600), (75, 120))]


def make_gt(num_images: int, seed: int = 0) -> dict:
    """COCO ground truth with small, medium and large boxes, non-contiguous ids and one crowd box."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for k in range(num_images):
        (h, w), _ = SIZES[k % len(SIZES)]
        image_id = 1000 + 7 * k  # ids are neither 0-based nor contiguous
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.jpg"})
        for side in rng.choice([16.0, 24.0, 48.0, 80.0, 120.0, 200.0], size=1 + k % 3, replace=False):
            bw, bh = float(side) * rng.uniform(0.8, 1.2), float(side) * rng.uniform(0.8, 1.2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0, "category_id": int(rng.choice(COCO_IDS[:6] + [90]))})
    anns[1]["iscrowd"] = 1
    categories = [{"id": c, "name": f"cat{c}", "supercategory": "thing"} for c in COCO_IDS]
    return {"images": images, "annotations": anns, "categories": categories}


class FakeCocoDataset:
    """The ShardedCocoDataset interface: image i is filled with the value i (read by FakeDetector)."""

    def __init__(self, gt: dict, duplicate_last: bool = False):
        self._gt = gt
        self.label_to_category_id = LABEL_TO_CATEGORY_ID
        label_of = {c: label for label, c in enumerate(LABEL_TO_CATEGORY_ID) if label}
        self._items = []
        for k, img in enumerate(gt["images"]):
            orig, size = SIZES[k % len(SIZES)]
            sy, sx = orig[0] / size[0], orig[1] / size[1]
            anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
            boxes = [[x / sx, y / sy, (x + w) / sx, (y + h) / sy] for x, y, w, h in (a["bbox"] for a in anns)]
            self._items.append({
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                "image_id": torch.tensor(img["id"]), "orig_size": torch.tensor(orig), "size": torch.tensor(size)})
        if duplicate_last:
            self._items.append(self._items[-1])

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        target = self._items[i]
        h, w = target["size"].tolist()
        return torch.full((3, h, w), float(i)), {k: v.clone() for k, v in target.items()}

    def coco_gt(self):
        return copy.deepcopy(self._gt)


class FakeDetector(torch.nn.Module):
    """Returns the ground truth of each image it is given, jittered and with one false positive if asked."""

    def __init__(self, dataset: FakeCocoDataset, jitter: float = 0.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.jitter = jitter
        self.seen: list[int] = []

    def forward(self, images):
        assert not self.training, "evaluate must put the model in eval mode"
        outputs = []
        for img in images:
            i = int(img[0, 0, 0])
            self.seen.append(i)
            t = self.targets[i]
            boxes, labels = t["boxes"] * self.scale, t["labels"]
            scores = torch.linspace(0.9, 0.5, len(boxes))
            if self.jitter:
                g = torch.Generator().manual_seed(i)  # the same detections whichever rank runs image i
                wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
                boxes = boxes + self.jitter * wh * torch.randn(boxes.shape, generator=g)
                scores = torch.rand(len(boxes), generator=g)
                boxes = torch.cat([boxes, torch.tensor([[1.0, 1.0, 20.0, 30.0]])])
                scores, labels = torch.cat([scores, torch.tensor([0.95])]), torch.cat([labels, torch.tensor([3])])
            outputs.append({"boxes": boxes, "scores": scores, "labels": labels})
        return outputs


def pycocotools_stats(gt_path, det_path) -> list[float]:
    """The reference: pycocotools run on the files, the way the COCO docs show it."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(det_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def assert_matches_stats(metrics: dict, stats: list[float]) -> None:
    assert set(metrics) == set(STAT_INDEX)
    for name, i in STAT_INDEX.items():
        assert metrics[name] == stats[i], name  # exactly, not approximately


def gt_as_detections(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in gt["annotations"]]


def perturbed_detections(gt: dict, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for det in gt_as_detections(gt):
        if rng.uniform() < 0.2:
            continue  # missed
        x, y, w, h = det["bbox"]
        det["bbox"] = [x + rng.normal(0, 0.1) * w, y + rng.normal(0, 0.1) * h,
                       w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
        det["score"] = float(rng.uniform())
        dets.append(det)
        if rng.uniform() < 0.3:  # a false positive of another category on the same spot
            dets.append(dict(det, category_id=COCO_IDS[rng.integers(80)], score=float(rng.uniform())))
    return dets


# --------------------------------------------------------------------------------------------------
# coco_metrics
# --------------------------------------------------------------------------------------------------
def test_ground_truth_as_detections_scores_one():
    gt = make_gt(8)
    metrics = coco_metrics(gt, gt_as_detections(gt))
    assert metrics == {name: 1.0 for name in STAT_INDEX}


def test_perturbed_detections_match_pycocotools_on_the_written_json(tmp_path):
    gt = make_gt(8)
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    dets = perturbed_detections(gt)
    before = copy.deepcopy(dets)
    write_results_json(det_path, dets)
    stats = pycocotools_stats(gt_path, det_path)
    assert 0.1 < stats[0] < 0.9  # a non-trivial score
    assert min(stats) >= 0  # every area range has ground truth
    for gt_arg in (gt_path, str(gt_path), gt, COCO(str(gt_path))):
        assert_matches_stats(coco_metrics(gt_arg, dets), stats)
    assert dets == before  # pycocotools' loadRes adds keys to what it gets; ours must not leak


def test_coco_metrics_prints_nothing(capsys):
    gt = make_gt(3)
    coco_metrics(gt, perturbed_detections(gt))
    assert capsys.readouterr().out == ""


def test_no_detections_gives_zeros():
    assert coco_metrics(make_gt(3), []) == {name: 0.0 for name in STAT_INDEX}


@pytest.mark.parametrize("change, message", [
    (dict(image_id=4242), "image id 4242"),
    (dict(category_id=12), "category id 12"),
    (dict(bbox=[1.0, 2.0, 3.0]), "bad bbox"),
    (dict(score=float("nan")), "bad bbox or score"),
])
def test_bad_detections_raise_clear_errors(change, message):
    gt = make_gt(3)
    dets = gt_as_detections(gt)
    dets[1].update(change)
    with pytest.raises(ValueError, match=message):
        coco_metrics(gt, dets)


def test_gt_without_annotations_key_is_rejected():
    with pytest.raises(ValueError, match="annotations"):
        coco_metrics({"images": [], "categories": []}, [])


# --------------------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------------------
def test_detections_to_coco_by_hand():
    # Input image 100 x 200 (h x w) from an original of 50 x 400: sx = 400/200 = 2, sy = 50/100 = 0.5.
    scale = box_scale(torch.tensor([50, 400]), torch.tensor([100, 200]))
    assert scale == (2.0, 0.5)
    dets = detections_to_coco(7, torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([0.75]),
                              torch.tensor([1]), LABEL_TO_CATEGORY_ID, scale)
    assert dets == [{"image_id": 7, "category_id": 1, "bbox": [20.0, 10.0, 40.0, 20.0], "score": 0.75}]
    assert all(type(v) is float for v in dets[0]["bbox"]) and type(dets[0]["image_id"]) is int
    assert detections_to_coco(7, np.zeros((0, 4)), [], [], LABEL_TO_CATEGORY_ID) == []


def test_labels_round_trip_to_non_contiguous_category_ids():
    labels = torch.arange(1, 81)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(80, 1)
    dets = detections_to_coco(1, boxes, torch.ones(80), labels, LABEL_TO_CATEGORY_ID)
    assert [d["category_id"] for d in dets] == COCO_IDS
    assert COCO_IDS[-1] == 90 and 12 not in COCO_IDS and len(COCO_IDS) == 80
    label_of = {c: label for label, c in enumerate(LABEL_TO_CATEGORY_ID) if label}
    assert [label_of[d["category_id"]] for d in dets] == labels.tolist()


@pytest.mark.parametrize("labels, message", [([0], r"labels \[0\] outside 1..80"), ([81], "outside"),
                                             ([1, 2], "1 boxes, 1 scores, 2 labels")])
def test_detections_to_coco_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        detections_to_coco(5, [[0, 0, 1, 1]], [0.5], labels, LABEL_TO_CATEGORY_ID)


def test_write_results_json_is_atomic(tmp_path):
    path = tmp_path / "out" / "detections.json"
    dets = gt_as_detections(make_gt(2))
    write_results_json(path, dets)
    assert json.loads(path.read_text()) == dets
    with pytest.raises(TypeError):
        write_results_json(path, [{"bad": object()}])
    assert json.loads(path.read_text()) == dets  # the old file survives a failed write
    assert os.listdir(path.parent) == ["detections.json"]  # and no temporary file is left


# --------------------------------------------------------------------------------------------------
# evaluate, one process
# --------------------------------------------------------------------------------------------------
def test_evaluate_perfect_detector(tmp_path):
    gt = make_gt(6)
    dataset = FakeCocoDataset(gt)
    model = FakeDetector(dataset).train()
    metrics = evaluate(model, dataset, comm.DistContext(), device="cpu", batch_size=4,
                       output_dir=tmp_path, progress=False)
    assert metrics == {name: 1.0 for name in STAT_INDEX}
    assert model.training  # given back in the mode it came in
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    dets = json.loads((tmp_path / "detections.json").read_text())
    expected = [a for a in gt["annotations"] if not a["iscrowd"]]
    assert [(d["image_id"], d["category_id"]) for d in dets] == [(a["image_id"], a["category_id"]) for a in expected]
    for det, ann in zip(dets, expected):  # back in original-image pixels
        assert det["bbox"] == pytest.approx(ann["bbox"], rel=1e-5)


def test_evaluate_jittered_matches_pycocotools(tmp_path):
    gt = make_gt(6)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dataset = FakeCocoDataset(gt)
    metrics = evaluate(FakeDetector(dataset, jitter=0.1), dataset, comm.DistContext(), device="cpu",
                       batch_size=3, gt=str(tmp_path / "gt.json"), output_dir=tmp_path, progress=False)
    stats = pycocotools_stats(tmp_path / "gt.json", tmp_path / "detections.json")
    assert 0 < stats[0] < 1
    assert_matches_stats(metrics, stats)


def test_evaluate_rejects_an_image_seen_twice():
    dataset = FakeCocoDataset(make_gt(3), duplicate_last=True)
    with pytest.raises(RuntimeError, match="more than once"):
        evaluate(FakeDetector(dataset), dataset, comm.DistContext(), device="cpu", progress=False)


def test_evaluate_rejects_ground_truth_images_never_evaluated():
    gt = make_gt(4)
    dataset = FakeCocoDataset(make_gt(3))
    with pytest.raises(RuntimeError, match="1 ground-truth images never evaluated"):
        evaluate(FakeDetector(dataset), dataset, comm.DistContext(), device="cpu", gt=gt, progress=False)


# --------------------------------------------------------------------------------------------------
# evaluate, 3 real ranks on a split of 10 images
# --------------------------------------------------------------------------------------------------
def _evaluate_worker(output_dir: str):
    ctx = comm.init()
    dataset = FakeCocoDataset(make_gt(10))
    model = FakeDetector(dataset, jitter=0.1)
    metrics = evaluate(model, dataset, ctx, device="cpu", batch_size=2, output_dir=output_dir)
    comm.shutdown(ctx)
    return {"rank": ctx.rank, "size": ctx.size, "seen": model.seen, "metrics": metrics}


def test_evaluate_on_three_ranks(tmp_path):
    results = run_ranks("tests.test_evaluation:_evaluate_worker", np=3, args=(str(tmp_path / "dist"),), timeout=120)
    assert [(r["rank"], r["size"]) for r in results] == [(0, 3), (1, 3), (2, 3)]
    assert [r["seen"] for r in results] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # each image exactly once
    assert [r["metrics"] is None for r in results] == [False, True, True]

    gt = make_gt(10)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    stats = pycocotools_stats(tmp_path / "gt.json", tmp_path / "dist" / "detections.json")
    assert 0 < stats[0] < 1
    assert_matches_stats(results[0]["metrics"], stats)

    dataset = FakeCocoDataset(gt)  # the same split in one process gives the same detections
    single = evaluate(FakeDetector(dataset, jitter=0.1), dataset, comm.DistContext(), device="cpu",
                      output_dir=tmp_path / "single", progress=False)
    assert single == results[0]["metrics"]
    assert (json.loads((tmp_path / "single" / "detections.json").read_text())
            == json.loads((tmp_path / "dist" / "detections.json").read_text()))
