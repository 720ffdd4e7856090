"""ShardedCocoDataset against the source JSON and image files (read independently here)."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from data_prep import verify
from hvd_megdet.data import ShardedCocoDataset, build_transforms
from hvd_megdet.data import h5_schema as S
from hvd_megdet.errors import DataError
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


def _broken_manifest(split: Path, case: str) -> None:
    manifest_path = split / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if case == "schema":
        manifest["schema_version"] = 999
    elif case == "no shards":
        del manifest["shards"]
    elif case == "short ids":
        manifest["shards"][1]["image_ids"].pop()
    if case == "not json":
        manifest_path.write_text('{"format": "hvd_megdet.coco_h5", ')  # cut short
    elif case == "missing":
        manifest_path.unlink()
    else:
        manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("case, message", [
    ("no directory", "{split}: no such directory (expected a split packed by `python -m data_prep coco_to_hdf5`"),
    ("missing", "{split}/manifest.json: missing; {split} is not a packed split, or packing did not finish"),
    ("not json", "{split}/manifest.json: cannot be read as JSON (Expecting property name enclosed in double quotes"),
    ("schema", "{split}/manifest.json: schema version 999, this code reads 1; repack the split"),
    ("no shards", "{split}/manifest.json: malformed manifest: 'shards' is not a non-empty list; repack the split"),
    ("short ids", "{split}/manifest.json: malformed manifest: shard entry 1 (train-00001-of-00004.h5): image ids, "
                  "widths and heights do not list 8 images; repack the split"),
], ids=["no directory", "no manifest", "manifest not JSON", "other schema", "no shards", "short id list"])
def test_bad_split_directory_is_one_line_naming_the_path(packed_dir: Path, tmp_path: Path, case: str, message: str):
    split = tmp_path / "train"
    if case != "no directory":
        shutil.copytree(packed_dir, split)
        _broken_manifest(split, case)
    with pytest.raises(DataError) as err:
        ShardedCocoDataset(split)
    assert str(err.value).startswith(message.format(split=split)) and "\n" not in str(err.value)


def _damage(shard: Path, case: str) -> None:
    if case == "truncated":  # the case: a copy cut at half its size
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    elif case == "missing":
        shard.unlink()
    elif case == "not hdf5":  # the superblock signature overwritten
        with open(shard, "r+b") as f:
            f.write(b"\0" * 8)
    elif case == "image bytes":  # an image's bytes zeroed inside an intact HDF5 file
        with h5py.File(shard, "r+") as f:
            a, b = f[S.IMAGE_OFFSETS][2], f[S.IMAGE_OFFSETS][3]
            f[S.IMAGE_DATA][a:b] = 0


@pytest.mark.parametrize("case, reason", [
    ("truncated", "OSError: Unable to synchronously open file (truncated file: eof = "),
    ("missing", "the file is missing"),
    ("not hdf5", "OSError: Unable to synchronously open file (file signature not found)"),
    ("image bytes", "UnidentifiedImageError: the stored image bytes are not an image Pillow can read"),
], ids=["truncated", "missing", "not HDF5", "image bytes zeroed"])
def test_damaged_shard_names_the_file_and_the_image_id(packed_dir: Path, tmp_path: Path, case: str, reason: str):
    split = tmp_path / "train"
    shutil.copytree(packed_dir, split)
    ds = ShardedCocoDataset(split)
    shard = split / "train-00001-of-00004.h5"
    _damage(shard, case)
    index = 8 + 2  # the third image of the second shard
    with pytest.raises(DataError) as err:
        ds[index]
    line = str(err.value)
    assert line.startswith(f"{shard}: cannot read image id {ds.image_ids[index]} ({reason}")
    assert line.endswith(f"); check the split with: python -m data_prep verify {split}") and "\n" not in line
    assert ds[0][0].shape[0] == 3 and ds[29][0].shape[0] == 3  # the other shards still read
    if case != "image bytes":  # the records and the evaluation ground truth name the file too
        with pytest.raises(DataError, match=f"{shard}: cannot read image id {ds.image_ids[index + 1]}"):
            ds.read_record(index + 1)
        with pytest.raises(DataError, match=f"{shard}: cannot read its image and annotation records"):
            ds.coco_gt()
    assert verify.main([str(split)]) == 1  # the command the message points at finds the same shard


def test_unreadable_shard_names_the_file(packed_dir: Path, tmp_path: Path):
    """Permission denied: as root, read as an unprivileged user in a forked child (root reads anything)."""
    split = tmp_path / "train"
    shutil.copytree(packed_dir, split)
    shard = split / "train-00002-of-00004.h5"
    shard.chmod(0)
    ds = ShardedCocoDataset(split)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() == 0:
                os.setuid(65534)  # nobody
            ds[16]
            os.write(w, b"read it")
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which asserts on it
            os.write(w, f"{type(err).__name__}: {err}".encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(w)
    with os.fdopen(r) as f:
        line = f.read()
    assert line.startswith(f"DataError: {shard}: cannot read image id {ds.image_ids[16]} (permission denied); ")


def test_png_and_bmp_decode_exactly(tiny_coco: TinyCoco, ds: ShardedCocoDataset):
    for i in (1, 2):  # conftest re-encoded these losslessly
        blob, info, _ = ds.read_record(i)
        assert Image.open(io.BytesIO(blob)).format == ("PNG" if i == 1 else "BMP")
        assert torch.equal(ds[i][0], _pil_tensor(tiny_coco.images / info["file_name"]))
