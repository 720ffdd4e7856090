"""ShardedCocoDataset against the source JSON and image files (read independently here)."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from hvd_megdet.data import ShardedCocoDataset, build_transforms
from tests.data.conftest import TinyCoco


@pytest.fixture(scope="module")
def ds(packed_dir: Path) -> ShardedCocoDataset:
    return ShardedCocoDataset(packed_dir)


def _pil_tensor(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


def test_metadata_without_opening_shards(tiny_coco: TinyCoco, packed_dir: Path):
    coco = tiny_coco.load()
    ds = ShardedCocoDataset(packed_dir)
    assert len(ds) == len(coco["images"])
    assert ds.image_ids == [i["id"] for i in coco["images"]]
    assert ds.aspect_ratios() == [i["width"] / i["height"] for i in coco["images"]]
    assert ds.get_height_and_width(0) == (coco["images"][0]["height"], coco["images"][0]["width"])
    assert ds.categories == coco["categories"] and ds.num_classes == 6
    assert list(ds.label_to_category_id[1:]) == [1, 3, 7, 12, 90]
    assert ds.category_id_to_label == {1: 1, 3: 2, 7: 3, 12: 4, 90: 5}
    assert ds.shard_sizes == [8, 8, 8, 6]
    assert ds._pid is None and not ds._open  # nothing opened: lazily, in the process that reads


def test_read_record_is_the_source(tiny_coco: TinyCoco, ds: ShardedCocoDataset):
    coco = tiny_coco.load()
    for i, img in enumerate(coco["images"]):
        blob, info, anns = ds.read_record(i)
        assert blob == (tiny_coco.images / img["file_name"]).read_bytes()
        assert info == img
        assert anns == [a for a in coco["annotations"] if a["image_id"] == img["id"]]
    assert ds.read_record(-1)[1] == coco["images"][-1]
    with pytest.raises(IndexError):
        ds.read_record(len(ds))


def test_getitem_image_and_target(tiny_coco: TinyCoco, ds: ShardedCocoDataset):
    coco = tiny_coco.load()
    for i, img in enumerate(coco["images"]):
        image, target = ds[i]
        # JPEG (torchvision decoder), PNG and BMP (lossless) against Pillow decoding the source file.
        torch.testing.assert_close(image, _pil_tensor(tiny_coco.images / img["file_name"]), atol=2 / 255, rtol=0)
        assert image.dtype == torch.float32 and image.shape == (3, img["height"], img["width"])
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                                dtype=torch.float64).to(torch.float32).reshape(-1, 4)
        assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"], expected)
        assert target["labels"].dtype == torch.int64
        assert [ds.label_to_category_id[int(k)] for k in target["labels"]] == [a["category_id"] for a in anns]
        assert [ds.category_id_to_label[a["category_id"]] for a in anns] == target["labels"].tolist()
        assert torch.equal(target["area"], torch.tensor([a["area"] for a in anns], dtype=torch.float32))
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0] * len(anns)
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        assert int(target["image_id"]) == img["id"]
        assert target["orig_size"].tolist() == target["size"].tolist() == [img["height"], img["width"]]


def test_crowd_boxes_kept_on_request(tiny_coco: TinyCoco, packed_dir: Path):
    coco = tiny_coco.load()
    ds = ShardedCocoDataset(packed_dir, skip_crowd=False)
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert crowd
    for a in crowd:
        i = ds.image_ids.index(a["image_id"])
        target = ds.target(i)
        n = sum(b["image_id"] == a["image_id"] for b in coco["annotations"])
        assert len(target["boxes"]) == n and target["iscrowd"].sum() == 1


def test_out_of_image_fraction_is_clamped(ds: ShardedCocoDataset):
    k, j = ds.locate(0)
    shard = ds._shard(k)
    a = shard.ann_offsets[j]
    saved = shard.bbox[a].copy()
    shard.bbox[a] = [-0.5, -0.25, 10.0, 10.0]  # within data_prep's tolerance
    try:
        assert ds.target(0)["boxes"][0].tolist() == [0.0, 0.0, 9.5, 9.75]
    finally:
        shard.bbox[a] = saved


def test_transforms_applied(packed_dir: Path):
    ds = ShardedCocoDataset(packed_dir, transforms=build_transforms(False, min_size=96, max_size=200))
    image, target = ds[0]
    assert min(image.shape[-2:]) == 96 and target["size"].tolist() == list(image.shape[-2:])
    assert target["orig_size"].tolist() == [ds.get_height_and_width(0)[0], ds.get_height_and_width(0)[1]]


def test_coco_gt_is_the_source_for_pycocotools(tiny_coco: TinyCoco, ds: ShardedCocoDataset, capsys):
    coco = tiny_coco.load()
    gt = ds.coco_gt()
    assert gt == {k: coco[k] for k in ("info", "licenses", "images", "annotations", "categories")}
    api = COCO()
    api.dataset = gt
    api.createIndex()
    assert sorted(api.getImgIds()) == sorted(ds.image_ids) and len(api.getAnnIds()) == len(coco["annotations"])


def test_handles_never_cross_fork_or_pickle(ds: ShardedCocoDataset):
    ds[0]
    assert ds._pid == os.getpid() and ds._open
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._pid is None and not clone._open
    assert torch.equal(clone[1][0], ds[1][0])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must open its own handle, not reuse the parent's
        inherited = dict(ds._open)  # (holding them keeps their addresses from being reused)
        ok = ds[0][0].shape[0] == 3 and ds._open[0] is not inherited[0] and list(ds._open) == [0]
        os.write(w, b"1" if ok and ds._pid == os.getpid() else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    ds.close()
    assert not ds._open


def test_lru_bound_on_open_files(packed_dir: Path):
    ds = ShardedCocoDataset(packed_dir, max_open_files=2)
    for i in range(len(ds)):
        ds[i]
    assert list(ds._open) == [2, 3]
    ds.close()


def test_other_schema_version_is_refused(packed_dir: Path, tmp_path: Path):
    import json
    import shutil

    shutil.copytree(packed_dir, tmp_path / "x")
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (tmp_path / "x" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema version 999"):
        ShardedCocoDataset(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        ShardedCocoDataset(tmp_path)


def test_png_and_bmp_decode_exactly(tiny_coco: TinyCoco, ds: ShardedCocoDataset):
    for i in (1, 2):  # conftest re-encoded these losslessly
        blob, info, _ = ds.read_record(i)
        assert Image.open(io.BytesIO(blob)).format == ("PNG" if i == 1 else "BMP")
        assert torch.equal(ds[i][0], _pil_tensor(tiny_coco.images / info["file_name"]))
