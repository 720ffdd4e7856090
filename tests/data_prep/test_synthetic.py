"""The synthetic COCO set: valid COCO, the promised variety, deterministic."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_prep import coco_records as R
from data_prep.synthetic import CLASSES, main, make_synthetic_coco, parse_size


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    path = make_synthetic_coco(root, 40, (80, 60), seed=3, split="val")
    return root, json.loads(path.read_text())


def test_is_valid_coco_with_the_promised_variety(synth):
    root, coco = synth
    records, issues = R.validate_coco(coco)
    assert issues == [] and len(records) == 40
    assert [c["id"] for c in coco["categories"]] == [1, 3, 7, 12, 90]
    sizes = {(i["width"], i["height"]) for i in coco["images"]}
    assert sizes == {(80, 60), (60, 80)}  # landscape and portrait
    anns = coco["annotations"]
    assert {a["category_id"] for a in anns} == {1, 3, 7, 12, 90}
    assert any(a["iscrowd"] for a in anns)
    assert sum(not r.annotations for r in records) >= 2  # empty images
    for a in anns:
        img = next(i for i in coco["images"] if i["id"] == a["image_id"])
        x, y, w, h = a["bbox"]
        side = min(img["width"], img["height"])
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        assert 0 < a["area"] <= w * h + 0.01  # area is rounded to 2 decimals
        if not a["iscrowd"]:
            assert 0.15 * side / 1.5 <= max(w, h) and min(w, h) <= 0.5 * side * 1.5
    ratios = [a["bbox"][2] / a["bbox"][3] for a in anns]
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # varied aspect ratios
    for img in coco["images"]:
        with Image.open(root / "images" / img["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (img["width"], img["height"])


def test_object_pixels_have_the_class_color(synth):
    root, coco = synth
    checked = 0
    for a in coco["annotations"]:
        if a["iscrowd"]:
            continue
        img = next(i for i in coco["images"] if i["id"] == a["image_id"])
        x, y, w, h = a["bbox"]
        color = next(c[2] for c in CLASSES if c[0] == a["category_id"])
        with Image.open(root / "images" / img["file_name"]) as im:
            center = im.convert("RGB").getpixel((int(x + w / 2), int(y + h / 2)))
        checked += max(abs(p - q) for p, q in zip(center, color)) < 40
    # Objects barely overlap, so the box centre shows the object's own colour in nearly every case.
    assert checked >= 0.85 * sum(not a["iscrowd"] for a in coco["annotations"])


def test_same_seed_same_bytes_and_cli(synth, tmp_path, capsys):
    root, coco = synth
    assert main(["--out", str(tmp_path), "--images", "40", "--size", "80x60", "--seed", "3", "--split", "val"]) == 0
    assert "wrote 40 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "annotations" / "instances_val.json").read_text()) == coco
    for img in coco["images"]:
        name = img["file_name"]
        assert (tmp_path / "images" / name).read_bytes() == (root / "images" / name).read_bytes()
    other = make_synthetic_coco(tmp_path / "other", 40, (80, 60), seed=4)
    assert json.loads(other.read_text())["annotations"] != coco["annotations"]


def test_parse_size():
    assert parse_size("640x480") == (640, 480)
    with pytest.raises(Exception, match="640x480"):
        parse_size("640")
