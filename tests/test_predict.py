"""hvd_megdet.tools.predict: detections drawn and written as COCO results, on 1 process and split over 2 ranks."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from hvd_megdet.tools import predict
from hvd_megdet.comm import DistContext
from hvd_megdet.config import load_config, to_dict
from hvd_megdet.data import ShardedCocoDataset
from hvd_megdet.model import build_model
from tests.mpirun import run_ranks

ROOT = Path(__file__).resolve().parent.parent
SCORE_THRESH = 0.3


def make_checkpoint(path: Path, train_path: Path, sets: list[str] = (), seed: int = 0) -> Path:
    """A checkpoint as train.py writes it ("model", "config"), with weights that look trained.

    The BN layers get random statistics and affine parameters (so eval-mode BN is far from the
    identity and any mistake in carrying them over shows), and the classifier prefers two classes
    by a wide margin (so detections score well above 0.3, as a trained model's do).
    """
    cfg = load_config(ROOT / "configs" / "smoke_cpu.yaml", [f"data.train_path={train_path}", *sets])
    num_classes = ShardedCocoDataset(train_path).num_classes
    torch.manual_seed(seed)
    model = build_model(cfg.model, DistContext(), num_classes, min_size=cfg.data.min_size, max_size=cfg.data.max_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = module.running_mean.numel()
                module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.1 * torch.randn(c, generator=gen))
        model.roi_heads.box_predictor.cls_score.bias[2] += 3.0
        model.roi_heads.box_predictor.cls_score.bias[4] += 2.5
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "world_size": 1}, path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_train_shards, tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", tiny_train_shards)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvd_megdet.tools.predict", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def _reference(checkpoint: Path, image: Image.Image) -> list[tuple[int, list[float], float]]:
    """The detector run directly, labels mapped to category ids as the dataset maps them."""
    detector = predict.load_detector(checkpoint)
    ds = ShardedCocoDataset(detector.config.data.train_path)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        out = detector.model([x])[0]
    keep = out["scores"] >= SCORE_THRESH
    return [(ds.label_to_category_id[int(l)], b.tolist(), float(s))
            for b, s, l in zip(out["boxes"][keep], out["scores"][keep], out["labels"][keep])]


def test_shards_one_process(trained, tiny_train_shards, tmp_path):
    out = tmp_path / "pred"
    proc = _cli("--checkpoint", str(trained), "--shards", str(tiny_train_shards), "--out", str(out),
                "--score-thresh", str(SCORE_THRESH), "--format", "png")
    assert proc.returncode == 0, proc.stderr
    ds = ShardedCocoDataset(tiny_train_shards)
    gt = ds.coco_gt()
    images = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in images["images"]] == ds.image_ids
    assert images["categories"] == sorted(gt["categories"], key=lambda c: c["id"])
    files = {im["id"]: Path(im["file_name"]).stem for im in gt["images"]}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{files[i]}.png" for i in ds.image_ids)
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) > 3 * len(ds) and min(d["score"] for d in detections) >= SCORE_THRESH
    # Image 0 against the detector run by hand: boxes xyxy -> COCO xywh, labels -> category ids.
    data, info, _ = ds.read_record(0)
    with Image.open(io.BytesIO(data)) as im:
        expected = _reference(trained, im.convert("RGB"))
    got = [(d["category_id"], d["bbox"], d["score"]) for d in detections if d["image_id"] == ds.image_ids[0]]
    assert len(got) == len(expected) > 0
    for (cat, (x, y, w, h), score), (ecat, (x1, y1, x2, y2), escore) in zip(got, expected):
        assert cat == ecat and score == pytest.approx(escore, abs=1e-5)
        assert [x, y, x + w, y + h] == pytest.approx([x1, y1, x2, y2], abs=1e-3)
    with Image.open(out / "images" / f"{files[ds.image_ids[0]]}.png") as drawn:
        assert drawn.size == (info["width"], info["height"])


def test_image_files_ids_and_unreadable_files(trained, tiny_train_shards, tmp_path):
    ds = ShardedCocoDataset(tiny_train_shards)
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        data, _, _ = ds.read_record(index)
        (photos / f"{ds.image_ids[index]:06d}.jpg").write_bytes(data)
    out = tmp_path / "pred"
    assert _cli("--checkpoint", str(trained), "--images", str(photos), "--out", str(out)).returncode == 0
    ids = [i["id"] for i in json.loads((out / "images.json").read_text())["images"]]
    assert ids == sorted(ds.image_ids[:3])  # numeric names are COCO ids
    (photos / "holiday.jpg").write_bytes(b"not a jpeg")
    proc = _cli("--checkpoint", str(trained), "--images", str(photos), "--out", str(tmp_path / "pred2"))
    assert proc.returncode == 1 and f"{photos / 'holiday.jpg'}: cannot read image" in proc.stderr
    images = json.loads((tmp_path / "pred2" / "images.json").read_text())["images"]
    assert [i["id"] for i in images] == [1, 2, 3]  # names not all numbers: positions, the bad one skipped
    assert len(list((tmp_path / "pred2" / "images").iterdir())) == 3


def test_same_name_twice_is_refused(trained, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (32, 24)).save(tmp_path / sub / "x.png")
    proc = _cli("--checkpoint", str(trained), "--images", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                "--out", str(tmp_path / "pred"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path / 'a' / 'x.png'} and {tmp_path / 'b' / 'x.png'} would both "
                                   f"be drawn to x.*: rename one")


def test_class_names_must_match_the_model(trained, tmp_path):
    (tmp_path / "cats.json").write_text(json.dumps({"categories": [{"id": 1, "name": "only one"}]}))
    proc = _cli("--checkpoint", str(trained), "--images", str(tmp_path), "--out", str(tmp_path / "p"),
                "--categories", str(tmp_path / "cats.json"))
    assert proc.returncode == 2 and "the model has 6 classes (with background) but the categories name 1" in proc.stderr


def test_draw_detections_boxes_in_class_colours():
    image = Image.new("RGB", (200, 100), "black")
    dets = [{"image_id": 1, "category_id": 7, "bbox": [50.0, 40.0, 100.0, 50.0], "score": 0.9}]
    drawn = np.asarray(predict.draw_detections(image, dets, {3: "cat", 7: "dog"}))
    colour = tuple(int(predict.PALETTE[1][i:i + 2], 16) for i in (1, 3, 5))  # second category id -> colour 1
    assert tuple(drawn[90, 100]) == colour  # the bottom edge
    assert tuple(drawn[65, 50]) == colour  # the left edge
    assert tuple(drawn[65, 100]) == (0, 0, 0)  # inside: untouched
    assert (drawn[25:40, 50:100] == colour).all(axis=2).sum() > 100  # the label's background above the box


def _predict_worker(argv: list[str]) -> int:
    return predict.main(argv)


def test_two_ranks_write_what_one_process_writes(trained, tiny_train_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--checkpoint", str(trained), "--shards", str(tiny_train_shards), "--score-thresh", str(SCORE_THRESH),
              "--format", "png"]
    assert _cli(*common, "--out", str(one)).returncode == 0
    assert run_ranks("tests.test_predict:_predict_worker", np=2, args=([*common, "--out", str(two)],)) == [0, 0]
    for name in ("detections.json", "images.json"):
        a, b = json.loads((one / name).read_text()), json.loads((two / name).read_text())
        assert a == b, name  # same images, same order, same numbers
    names = sorted(p.name for p in (one / "images").iterdir())
    assert names == sorted(p.name for p in (two / "images").iterdir()) and len(names) == 16
    for name in names:
        assert (one / "images" / name).read_bytes() == (two / "images" / name).read_bytes()


def test_a_rank_that_cannot_write_stops_every_rank(trained, tiny_train_shards, tmp_path):
    """Rank 1 cannot write its last image (a directory is in the way): both ranks end, none waits."""
    out = tmp_path / "pred"
    last = predict.shard_items(ShardedCocoDataset(tiny_train_shards))[-1]
    (out / "images" / f"{last.name}.png").mkdir(parents=True)
    argv = ["--checkpoint", str(trained), "--shards", str(tiny_train_shards), "--out", str(out), "--format", "png"]
    assert run_ranks("tests.test_predict:_predict_worker", np=2, args=(argv,), timeout=240) == [1, 1]
    assert not (out / "detections.json").exists()
