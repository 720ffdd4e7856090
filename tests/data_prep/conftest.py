"""Session fixtures: a tiny synthetic COCO set (with a PNG, a BMP and a sub-path) and its packed shards."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from data_prep import coco_to_hdf5
from data_prep.synthetic import make_synthetic_coco

NUM_IMAGES = 30
SIZE = (64, 48)
IMAGES_PER_SHARD = 8  # 30 images -> 4 shards, the last one short


@dataclass(frozen=True)
class TinyCoco:
    root: Path
    images: Path  # image root (file_name is relative to it)
    annotations: Path  # instances JSON

    def load(self) -> dict[str, Any]:
        return json.loads(self.annotations.read_text())


def make_tiny_coco(root: Path, num_images: int = NUM_IMAGES, seed: int = 0) -> TinyCoco:
    """The synthetic set, with image 1 re-encoded as PNG, image 2 as BMP and image 3 moved to a sub-path."""
    ann_path = make_synthetic_coco(root, num_images, SIZE, seed=seed, split="train")
    images = root / "images"
    coco = json.loads(ann_path.read_text())
    for k, new_name in ((1, "png/{}.png"), (2, "{}.bmp"), (3, "sub/dir/{}.jpg")):
        entry = coco["images"][k]
        old = images / entry["file_name"]
        new = images / new_name.format(Path(entry["file_name"]).stem)
        new.parent.mkdir(parents=True, exist_ok=True)
        if new.suffix == ".jpg":
            shutil.move(old, new)
        else:
            Image.open(old).convert("RGB").save(new)
            old.unlink()
        entry["file_name"] = str(new.relative_to(images))
    ann_path.write_text(json.dumps(coco))
    return TinyCoco(root, images, ann_path)


def copy_tiny_coco(src: TinyCoco, dst: Path) -> TinyCoco:
    """A private copy that a test may corrupt."""
    shutil.copytree(src.root, dst)
    return TinyCoco(dst, dst / src.images.relative_to(src.root), dst / src.annotations.relative_to(src.root))


def pack(tiny: TinyCoco, out: Path, *extra: str, images_per_shard: int = IMAGES_PER_SHARD) -> int:
    return coco_to_hdf5.main(["--images", str(tiny.images), "--annotations", str(tiny.annotations),
                              "--out", str(out), "--images-per-shard", str(images_per_shard), *extra])


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> TinyCoco:
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


@pytest.fixture(scope="session")
def packed_dir(tiny_coco: TinyCoco, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "train"
    assert pack(tiny_coco, out) == 0
    return out
