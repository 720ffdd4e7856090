"""The JSON validation catalogue, on hand-made COCO dicts (no files)."""
from __future__ import annotations

import copy
import json

import pytest

from data_prep import coco_records as R


def _coco() -> dict:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 80} for i in (1, 2, 3, 4)]
    anns = [
        {"id": 10, "image_id": 1, "bbox": [10, 10, 20, 20], "category_id": 5, "iscrowd": 0, "area": 400.0},
        {"id": 11, "image_id": 1, "bbox": [0.0, 0.0, 100.0, 80.0], "category_id": 9, "iscrowd": 1, "area": 8000},
        {"id": 12, "image_id": 2, "bbox": [50.5, 30.25, 49.5, 49.75], "category_id": 5, "iscrowd": 0, "area": 1.5},
        {"id": 13, "image_id": 3, "bbox": [-0.5, 0, 10, 80.6], "category_id": 9, "iscrowd": 0, "area": 7.0},
    ]
    cats = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _reasons(issues) -> list[tuple]:
    return [(i.reason, i.image_id, i.annotation_id) for i in issues]


def test_clean_input_keeps_everything_in_source_order():
    coco = _coco()
    records, issues = R.validate_coco(copy.deepcopy(coco))
    assert issues == []
    assert [r.info for r in records] == coco["images"]  # image 4 kept although it has no annotation
    assert [a for r in records for a in r.annotations] == coco["annotations"]
    assert [len(r.annotations) for r in records] == [2, 1, 1, 0]


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["annotations"][0]["bbox"].__setitem__(2, 0), [(R.BBOX_NON_POSITIVE, 1, 10)]),
    (lambda c: c["annotations"][0]["bbox"].__setitem__(3, -4), [(R.BBOX_NON_POSITIVE, 1, 10)]),
    (lambda c: c["annotations"][0]["bbox"].__setitem__(0, 85.0), [(R.BBOX_OUTSIDE_IMAGE, 1, 10)]),  # 85+20 > 101
    (lambda c: c["annotations"][0]["bbox"].__setitem__(1, -1.5), [(R.BBOX_OUTSIDE_IMAGE, 1, 10)]),
    (lambda c: c["annotations"][0]["bbox"].__setitem__(0, 100.2), [(R.BBOX_OUTSIDE_IMAGE, 1, 10)]),
    (lambda c: c["annotations"][0].__setitem__("category_id", 7), [(R.UNKNOWN_CATEGORY, 1, 10)]),
    (lambda c: c["annotations"][2].__setitem__("image_id", 77), [(R.ANNOTATION_FOR_MISSING_IMAGE, 77, 12)]),
    (lambda c: c["annotations"][2].__setitem__("id", 10), [(R.DUPLICATE_ANNOTATION_ID, 1, 10),
                                                           (R.DUPLICATE_ANNOTATION_ID, 2, 10)]),
    (lambda c: c["annotations"][0].pop("area"), [(R.MALFORMED_ANNOTATION, 1, 10)]),
    (lambda c: c["annotations"][0].__setitem__("bbox", [1, 2, 3]), [(R.MALFORMED_ANNOTATION, 1, 10)]),
    (lambda c: c["annotations"][0].__setitem__("bbox", [1, 2, float("nan"), 3]), [(R.MALFORMED_ANNOTATION, 1, 10)]),
    (lambda c: c["annotations"][0].__setitem__("iscrowd", 2), [(R.MALFORMED_ANNOTATION, 1, 10)]),
    (lambda c: c["images"][3].__setitem__("width", "wide"), [(R.MALFORMED_IMAGE, 4, None)]),
    (lambda c: c["images"][1].__setitem__("id", 1), [(R.DUPLICATE_IMAGE_ID, 1, None), (R.DUPLICATE_IMAGE_ID, 1, None),
                                                     (R.IMAGE_DROPPED, 1, 10), (R.IMAGE_DROPPED, 1, 11),
                                                     (R.ANNOTATION_FOR_MISSING_IMAGE, 2, 12)]),
])
def test_each_bad_item_is_dropped_and_named(mutate, expected):
    coco = _coco()
    mutate(coco)
    records, issues = R.validate_coco(coco)
    assert _reasons(issues) == expected
    dropped_anns = {a for _, _, a in expected if a is not None}
    kept_anns = [a["id"] for r in records for a in r.annotations]
    assert set(kept_anns) == {a["id"] for a in coco["annotations"] if isinstance(a.get("id"), int)} - dropped_anns
    for issue in issues:  # the file is named whenever the image is known
        if issue.reason in (R.BBOX_NON_POSITIVE, R.BBOX_OUTSIDE_IMAGE, R.UNKNOWN_CATEGORY):
            assert issue.file == f"{issue.image_id}.jpg"


def test_box_sticking_out_by_less_than_the_tolerance_is_kept():
    records, issues = R.validate_coco(_coco())  # annotation 13: x=-0.5, y+h=80.6 on an 80-pixel-high image
    assert issues == [] and records[2].annotations[0]["id"] == 13


def test_drop_images_reports_their_annotations_and_drop_empty():
    records, _ = R.validate_coco(_coco())
    issue = R.Issue(R.CORRUPT_IMAGE_FILE, 1, None, "1.jpg", "truncated")
    kept, issues = R.drop_images(records, {0: issue})
    assert [r.id for r in kept] == [2, 3, 4]
    assert _reasons(issues) == [(R.CORRUPT_IMAGE_FILE, 1, None), (R.IMAGE_DROPPED, 1, 10), (R.IMAGE_DROPPED, 1, 11)]
    kept, empty = R.drop_empty_images(kept)
    assert [r.id for r in kept] == [2, 3] and _reasons(empty) == [(R.NO_ANNOTATIONS, 4, None)]
    assert R.count_reasons(issues + empty) == {R.IMAGE_DROPPED: 2, R.CORRUPT_IMAGE_FILE: 1, R.NO_ANNOTATIONS: 1}
    table = R.format_reason_table(issues + empty)
    assert f"{R.IMAGE_DROPPED}  " in table and table.splitlines()[-1].split() == ["total", "4"]


@pytest.mark.parametrize("text, message", [
    ('{"images": [', "line 1 column 13"),
    ('[1, 2]', "top level is list"),
    ('{"images": [], "annotations": []}', "'categories'"),
    ('{"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}', "duplicate category id 1"),
])
def test_unusable_json_raises_naming_the_file(tmp_path, text, message):
    path = tmp_path / "instances_bad.json"
    path.write_text(text)
    with pytest.raises(R.CocoFormatError, match=message) as info:
        R.load_coco_json(path)
    assert str(path) in str(info.value)


def test_load_accepts_a_file_without_annotations(tmp_path):
    path = tmp_path / "image_info.json"
    path.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "a"}]}))
    assert R.validate_coco(R.load_coco_json(path)) == ([], [])
