"""Packing end to end: lossless round trip, manifest, bad input (default and --strict), resume, mpirun."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py

from data_prep import coco_records as R
from data_prep import coco_to_hdf5, verify
from data_prep.world import get_world
from hvd_megdet.data import h5_schema as S
from tests.data_prep.conftest import IMAGES_PER_SHARD, NUM_IMAGES, TinyCoco, copy_tiny_coco, pack
from tests.mpirun import run_ranks


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_back(out: Path) -> list[tuple[bytes, dict, list[dict]]]:
    """Every stored (image bytes, image dict, annotation dicts), straight from the HDF5 files."""
    manifest = json.loads((out / S.MANIFEST_NAME).read_text())
    records = []
    for entry in manifest[S.M_SHARDS]:
        with h5py.File(out / entry[S.S_FILE], "r") as f:
            data, off, aoff = f[S.IMAGE_DATA][:], f[S.IMAGE_OFFSETS][:], f[S.ANN_OFFSETS][:]
            anns = [json.loads(s) for s in f[S.ANN_JSON].asstr()[:]] if len(f[S.ANN_JSON]) else []
            for k, info in enumerate(f[S.IMAGE_JSON].asstr()[:]):
                records.append((data[off[k]:off[k + 1]].tobytes(), json.loads(info), anns[aoff[k]:aoff[k + 1]]))
    return records


def test_round_trip_is_lossless(tiny_coco: TinyCoco, packed_dir: Path):
    coco = tiny_coco.load()
    stored = _read_back(packed_dir)
    assert len(stored) == NUM_IMAGES == len(coco["images"])
    for (blob, info, anns), src in zip(stored, coco["images"]):
        assert info == src  # includes the PNG, BMP and sub-path file names
        assert blob == (tiny_coco.images / src["file_name"]).read_bytes()
        assert anns == [a for a in coco["annotations"] if a["image_id"] == src["id"]]
    assert any(not anns for _, _, anns in stored)  # images without annotations are kept by default


def test_manifest(tiny_coco: TinyCoco, packed_dir: Path):
    coco = tiny_coco.load()
    manifest = S.load_manifest(packed_dir)
    assert manifest[S.M_SPLIT] == "train"
    assert manifest[S.M_NUM_IMAGES] == NUM_IMAGES
    assert manifest[S.M_NUM_ANNOTATIONS] == len(coco["annotations"])
    assert manifest[S.M_CATEGORIES] == coco["categories"] and manifest[S.M_INFO] == coco["info"]
    assert manifest[S.M_SOURCE]["annotation_sha256"] == _sha256(tiny_coco.annotations)
    assert manifest[S.M_DROPPED] == {"counts": {}, "items": []}
    shards = manifest[S.M_SHARDS]
    assert [s[S.S_FILE] for s in shards] == [f"train-0000{k}-of-00004.h5" for k in range(4)]
    assert [s[S.S_NUM_IMAGES] for s in shards] == [8, 8, 8, 6]
    assert sorted(p.name for p in packed_dir.iterdir()) == [S.MANIFEST_NAME] + [s[S.S_FILE] for s in shards]
    for s in shards:
        assert s[S.S_SHA256] == _sha256(packed_dir / s[S.S_FILE])
    assert [i for s in shards for i in s[S.S_IMAGE_IDS]] == [img["id"] for img in coco["images"]]
    assert [w for s in shards for w in s[S.S_WIDTHS]] == [img["width"] for img in coco["images"]]


def test_drop_empty_and_drop_segmentation(tiny_coco: TinyCoco, tmp_path: Path):
    coco = tiny_coco.load()
    assert pack(tiny_coco, tmp_path / "out", "--drop-empty", "--drop-segmentation") == 0
    stored = _read_back(tmp_path / "out")
    with_anns = {a["image_id"] for a in coco["annotations"]}
    assert [info["id"] for _, info, _ in stored] == [i["id"] for i in coco["images"] if i["id"] in with_anns]
    assert all("segmentation" not in a and set(a) == set(R.ANNOTATION_FIELDS) for _, _, anns in stored for a in anns)
    manifest = S.load_manifest(tmp_path / "out")
    assert manifest[S.M_DROPPED]["counts"] == {R.NO_ANNOTATIONS: NUM_IMAGES - len(with_anns)}
    assert manifest[S.M_OPTIONS] == {"drop_empty": True, "drop_segmentation": True, "strict": False}


def _corrupt(tiny: TinyCoco) -> tuple[dict[str, int], set[tuple]]:
    """Break a copy of the tiny set in every catalogued way; return the expected counts and named items."""
    coco = tiny.load()
    imgs, anns = coco["images"], coco["annotations"]
    with_anns = [img for img in imgs if any(a["image_id"] == img["id"] for a in anns)]
    n_anns = {img["id"]: sum(a["image_id"] == img["id"] for a in anns) for img in imgs}
    missing, truncated, garbage, resized, duplicated = with_anns[4:9]
    (tiny.images / missing["file_name"]).unlink()
    blob = (tiny.images / truncated["file_name"]).read_bytes()
    (tiny.images / truncated["file_name"]).write_bytes(blob[: len(blob) // 2])
    (tiny.images / garbage["file_name"]).write_bytes(b"this is not an image")
    resized["width"] += 1
    imgs.append(dict(duplicated, file_name=missing["file_name"]))  # a second entry with the same id
    victims = [a for a in anns if a["image_id"] == with_anns[9]["id"]][:1] + \
              [a for a in anns if a["image_id"] == with_anns[10]["id"]][:1] + \
              [a for a in anns if a["image_id"] == with_anns[11]["id"]][:1]
    victims[0]["bbox"][2] = 0.0
    victims[1]["bbox"][0] = victims[1]["bbox"][0] + 1000
    victims[2]["category_id"] = 999
    orphan = dict(victims[2], id=999_999, image_id=123_456_789, category_id=1)
    anns.append(orphan)
    tiny.annotations.write_text(json.dumps(coco))
    counts = {R.MISSING_IMAGE_FILE: 1, R.CORRUPT_IMAGE_FILE: 2, R.IMAGE_SIZE_MISMATCH: 1, R.DUPLICATE_IMAGE_ID: 2,
              R.BBOX_NON_POSITIVE: 1, R.BBOX_OUTSIDE_IMAGE: 1, R.UNKNOWN_CATEGORY: 1,
              R.ANNOTATION_FOR_MISSING_IMAGE: 1,
              R.IMAGE_DROPPED: sum(n_anns[i["id"]] for i in (missing, truncated, garbage, resized, duplicated))}
    named = {(R.MISSING_IMAGE_FILE, missing["id"], None, missing["file_name"]),
             (R.CORRUPT_IMAGE_FILE, truncated["id"], None, truncated["file_name"]),
             (R.CORRUPT_IMAGE_FILE, garbage["id"], None, garbage["file_name"]),
             (R.IMAGE_SIZE_MISMATCH, resized["id"], None, resized["file_name"]),
             (R.DUPLICATE_IMAGE_ID, duplicated["id"], None, duplicated["file_name"]),
             (R.DUPLICATE_IMAGE_ID, duplicated["id"], None, missing["file_name"]),
             (R.BBOX_NON_POSITIVE, with_anns[9]["id"], victims[0]["id"], with_anns[9]["file_name"]),
             (R.BBOX_OUTSIDE_IMAGE, with_anns[10]["id"], victims[1]["id"], with_anns[10]["file_name"]),
             (R.UNKNOWN_CATEGORY, with_anns[11]["id"], victims[2]["id"], with_anns[11]["file_name"]),
             (R.ANNOTATION_FOR_MISSING_IMAGE, 123_456_789, 999_999, None)}
    return counts, named


def test_bad_input_default_drops_and_tabulates(tiny_coco: TinyCoco, tmp_path: Path, capsys):
    tiny = copy_tiny_coco(tiny_coco, tmp_path / "src")
    counts, named = _corrupt(tiny)
    assert pack(tiny, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines()]
    table = {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}
    assert table == {**counts, "total": sum(counts.values())}
    for reason, image_id, ann_id, file in named:  # every bad item is named on its own line
        assert f"dropped {reason}: image_id={image_id} annotation_id={ann_id} file={file} (" in printed
    manifest = S.load_manifest(tmp_path / "out")
    assert manifest[S.M_DROPPED]["counts"] == dict(sorted(counts.items()))
    items = {(i["reason"], i["image_id"], i["annotation_id"], i["file"]) for i in manifest[S.M_DROPPED]["items"]}
    assert named <= items
    dropped_images = {image_id for reason, image_id, ann, _ in named if ann is None}
    coco = tiny.load()
    assert manifest[S.M_NUM_IMAGES] == NUM_IMAGES - len(dropped_images)
    assert verify.main([str(tmp_path / "out")]) == 0
    stored_ann_ids = {a["id"] for _, _, anns in _read_back(tmp_path / "out") for a in anns}
    dropped_ann_ids = {i["annotation_id"] for i in manifest[S.M_DROPPED]["items"]}
    assert stored_ann_ids == {a["id"] for a in coco["annotations"]} - dropped_ann_ids


def test_bad_input_strict_names_every_item_and_writes_nothing(tiny_coco: TinyCoco, tmp_path: Path, capsys):
    tiny = copy_tiny_coco(tiny_coco, tmp_path / "src")
    _, named = _corrupt(tiny)
    assert pack(tiny, tmp_path / "out", "--strict") == 2
    assert not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines()]
    for reason, image_id, ann_id, file in named:
        assert f"{reason}: image_id={image_id} annotation_id={ann_id} file={file} (" in "\n".join(
            line[: line.index("(") + 1] for line in lines if "(" in line)
    assert R.IMAGE_DROPPED not in err.split("nothing written")[1].split("reason")[0]  # consequences not listed


def test_malformed_json_fails_in_both_modes(tiny_coco: TinyCoco, tmp_path: Path, capsys):
    tiny = copy_tiny_coco(tiny_coco, tmp_path / "src")
    tiny.annotations.write_text(tiny.annotations.read_text()[:-40])
    for extra in ((), ("--strict",)):
        assert pack(tiny, tmp_path / "out", *extra) == 2
        assert f"{tiny.annotations}: malformed JSON at line 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rerun_resumes_a_half_written_output(tiny_coco: TinyCoco, packed_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert pack(tiny_coco, out) == 0
    names = [e[S.S_FILE] for e in S.load_manifest(out)[S.M_SHARDS]]
    manifest_text = (out / S.MANIFEST_NAME).read_text()
    # An interrupted run: no manifest, shard 2 never renamed (a .tmp left), shard 3 damaged.
    (out / S.MANIFEST_NAME).unlink()
    (out / names[2]).rename(out / (names[2] + S.TMP_SUFFIX))
    (out / (names[2] + S.TMP_SUFFIX)).write_bytes(b"partial")
    blob = bytearray((out / names[3]).read_bytes())
    blob[len(blob) // 2:len(blob) // 2 + 100] = bytes(b ^ 0xFF for b in blob[len(blob) // 2:len(blob) // 2 + 100])
    (out / names[3]).write_bytes(blob)
    before = {n: (out / n).stat() for n in names[:2]}
    capsys.readouterr()
    assert pack(tiny_coco, out) == 0
    assert "kept 2 shard(s)" in capsys.readouterr().out
    for n in names[:2]:  # complete shards were not rewritten
        assert (out / n).stat().st_ino == before[n].st_ino and (out / n).stat().st_mtime_ns == before[n].st_mtime_ns
    assert (out / S.MANIFEST_NAME).read_text() == manifest_text
    assert sorted(p.name for p in out.iterdir()) == sorted([S.MANIFEST_NAME, *names])
    for n in names:  # same bytes as an uninterrupted packing
        assert _sha256(out / n) == _sha256(packed_dir / n)


def test_rerun_rewrites_only_shards_whose_inputs_changed(tiny_coco: TinyCoco, tmp_path: Path, capsys):
    tiny = copy_tiny_coco(tiny_coco, tmp_path / "src")
    out = tmp_path / "out"
    assert pack(tiny, out) == 0
    coco = tiny.load()
    target = next(a for a in coco["annotations"] if a["image_id"] == coco["images"][IMAGES_PER_SHARD + 1]["id"])
    target["area"] += 1.0  # an image of shard 1
    tiny.annotations.write_text(json.dumps(coco))
    names = [e[S.S_FILE] for e in S.load_manifest(out)[S.M_SHARDS]]
    inodes = {n: (out / n).stat().st_mtime_ns for n in names}
    capsys.readouterr()
    assert pack(tiny, out) == 0
    assert "kept 3 shard(s)" in capsys.readouterr().out
    assert [(out / n).stat().st_mtime_ns == inodes[n] for n in names] == [True, False, True, True]
    assert verify.main([str(out)]) == 0


def test_split_name():
    assert coco_to_hdf5.split_name("/x/instances_val2017.json") == "val2017"
    assert coco_to_hdf5.split_name("my_split.json") == "my_split"


def _pack_worker(images: str, annotations: str, out: str) -> tuple[int, int, int]:
    code = coco_to_hdf5.main(["--images", images, "--annotations", annotations, "--out", out,
                              "--images-per-shard", str(IMAGES_PER_SHARD)])
    world = get_world()
    return code, world.rank, world.size


def test_mpirun_two_ranks_write_the_same_shards_as_one_process(tiny_coco: TinyCoco, packed_dir: Path,
                                                               tmp_path: Path):
    out = tmp_path / "mpi"
    codes = run_ranks("tests.data_prep.test_coco_to_hdf5:_pack_worker", np=2,
                      args=(str(tiny_coco.images), str(tiny_coco.annotations), str(out)), timeout=120)
    assert codes == [(0, 0, 2), (0, 1, 2)]
    assert (out / S.MANIFEST_NAME).read_text() == (packed_dir / S.MANIFEST_NAME).read_text()
    names = sorted(p.name for p in packed_dir.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (packed_dir / name).read_bytes()
