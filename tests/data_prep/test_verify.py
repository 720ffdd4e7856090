"""verify: a good split passes; each kind of damage is found and named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from data_prep import verify
from hvd_megdet.data import h5_schema as S


def _copy(packed_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "copy"
    shutil.copytree(packed_dir, out)
    return out, json.loads((out / S.MANIFEST_NAME).read_text())


def test_good_split_passes(packed_dir: Path, capsys):
    assert verify.main([str(packed_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == 4 and "30 images" in out and "all good" in out


def test_flipped_image_byte_is_found(packed_dir: Path, tmp_path: Path, capsys):
    out, manifest = _copy(packed_dir, tmp_path)
    name = manifest[S.M_SHARDS][1][S.S_FILE]
    with h5py.File(out / name, "r+") as f:  # change one byte of image 2's file inside the shard
        k = int(f[S.IMAGE_OFFSETS][2]) + 10
        f[S.IMAGE_DATA][k] = np.uint8(f[S.IMAGE_DATA][k] ^ 0xFF)
        image_id = int(f[S.IMAGE_ID][2])
    assert verify.main([str(out)]) == 1
    text = capsys.readouterr().out
    assert f"BAD  {name}" in text and f"image_id={image_id}: CRC-32 mismatch" in text and "1 with problems" in text


def test_changed_annotation_value_is_found(packed_dir: Path, tmp_path: Path, capsys):
    out, manifest = _copy(packed_dir, tmp_path)
    name = manifest[S.M_SHARDS][0][S.S_FILE]
    with h5py.File(out / name, "r+") as f:
        f[S.ANN_AREA][0] = f[S.ANN_AREA][0] + 1
    assert verify.main([str(out)]) == 1
    assert "dataset values differ" in capsys.readouterr().out


def test_missing_shard_wrong_count_and_bad_checksum(packed_dir: Path, tmp_path: Path, capsys):
    out, manifest = _copy(packed_dir, tmp_path)
    shards = manifest[S.M_SHARDS]
    (out / shards[0][S.S_FILE]).unlink()
    shards[1][S.S_NUM_IMAGES] += 1
    shards[2][S.S_SHA256] = "0" * 64
    (out / S.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify.main([str(out)]) == 1
    text = capsys.readouterr().out
    assert "file is missing" in text and "9 images, manifest says 8" not in text
    assert "8 images, manifest says 9" in text and "SHA-256 differs" in text
    assert "shards hold 31 images, manifest says 30" in text and "4 with problems" in text


def test_no_manifest(tmp_path: Path, capsys):
    assert verify.main([str(tmp_path)]) == 1
    assert "manifest.json" in capsys.readouterr().err
