"""Shared fixtures: a small synthetic COCO split packed into shards by the real data_prep commands."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def make_synthetic_shards(out: Path, images: int, size: str, seed: int, split: str = "train") -> Path:
    """data_prep.synthetic then data_prep.coco_to_hdf5, as a user runs them; returns the shard dir."""
    raw = out / "raw"
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(raw), "--images", str(images),
                    "--size", size, "--seed", str(seed), "--split", split], check=True, cwd=ROOT,
                   capture_output=True)
    shards = out / "shards" / split
    subprocess.run([sys.executable, "-m", "data_prep.coco_to_hdf5", "--images", str(raw / "images"),
                    "--annotations", str(raw / "annotations" / f"instances_{split}.json"),
                    "--out", str(shards), "--images-per-shard", "8"], check=True, cwd=ROOT, capture_output=True)
    return shards


@pytest.fixture(scope="session")
def tiny_train_shards(tmp_path_factory) -> Path:
    """16 images of 128x96 (some portrait), 5 classes with non-contiguous COCO ids."""
    return make_synthetic_shards(tmp_path_factory.mktemp("tiny_train"), 16, "128x96", seed=3)
