"""hvd_megdet.tools.export: the documented lines rebuild, without hvd_megdet, the detector hvd_megdet trained."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvd_megdet.tools import export
from hvd_megdet.data import ShardedCocoDataset
from hvd_megdet.tools.predict import load_detector
from tests.test_predict import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent

# Run before the snippet: any import of hvd_megdet fails, so the snippet cannot lean on it.
NO_HVD_MEGDET = """\
import sys
sys.modules["hvd_megdet"] = None
"""
# Run after the snippet: what the test compares. In float64, where rounding no longer hides a
# small mismatch (an eps, a statistic): in float32 rounding differences between FrozenBatchNorm2d's
# and eval BatchNorm's arithmetic, compounded over a ResNet with random statistics, move boxes by
# up to 0.2 px, and an eps off by 1e-5 only by 1.4 px.
COMPARE = """
images = [image.double() for image in torch.load("images.pt", weights_only=True)]
model.double()
with torch.no_grad():
    detections = model(images)
    features = model.backbone(torch.stack(images[:1]))
raw = torch.load("ckpt.pt", weights_only=False)["model"]
model.load_state_dict(raw)  # a checkpoint loads strictly too (FrozenBatchNorm2d drops num_batches_tracked)
torch.save({"detections": detections, "features": dict(features), "class_names": class_names}, "plain.pt")
assert not any(name.startswith("hvd_megdet") and mod is not None for name, mod in sys.modules.items())
"""

MODES = {
    "cgbn": [],
    "frozen": ["model.norm=frozen", "model.box_fc_dim=1024"],  # the paper's head width (the smoke config's is 128)
    "local_bn_fpn_head": ["model.norm=local", "model.bn_in_fpn=true", "model.bn_in_head=true"],
    "sublinear_partly_frozen": ["model.sublinear_memory=true", "model.trainable_layers=3", "model.backbone=resnet34"],
}


@pytest.mark.parametrize("mode", MODES)
def test_readme_lines_rebuild_the_same_detector(mode, tiny_train_shards, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", tiny_train_shards, MODES[mode], seed=len(mode))
    assert export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "model.pt")]) == 0
    gen = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 96, 128, generator=gen), torch.rand(3, 120, 90, generator=gen)]
    torch.save(images, tmp_path / "images.pt")
    # Exactly the lines docs/after_training.md shows, in a fresh interpreter that cannot import hvd_megdet.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", NO_HVD_MEGDET + export.LOAD_SNIPPET + COMPARE], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)

    detector = load_detector(ckpt)  # hvd_megdet's model, in eval mode
    images = [image.double() for image in images]
    with torch.no_grad():
        expected = detector.model.double()(images)
        features = detector.model.backbone(torch.stack(images[:1]))
    for name, value in features.items():  # BN carried over right: the FPN's outputs agree to rounding
        assert (plain["features"][name] - value).abs().max() <= 1e-10 * value.abs().max(), name
    for got, want in zip(plain["detections"], expected, strict=True):
        assert len(want["boxes"]) > 5
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-9)
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-6)
    names = {i: c["name"] for i, c in enumerate(sorted(ShardedCocoDataset(tiny_train_shards).categories,
                                                       key=lambda c: c["id"]), start=1)}
    assert plain["class_names"] == names


def test_exported_file_contents(tiny_train_shards, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", tiny_train_shards)
    exported = torch.load(export.export(ckpt, tmp_path / "m.pt"), weights_only=True)
    assert exported["format"] == export.FORMAT and exported["backbone"] == "resnet18"
    assert (exported["min_size"], exported["max_size"]) == (64, 96)
    assert exported["fpn_in_channels"] == [64, 128, 256, 512]
    assert exported["box_fc_dim"] == 128 == exported["model"]["roi_heads.box_head.fc6.weight"].shape[0]
    ds = ShardedCocoDataset(tiny_train_shards)
    assert [c["id"] for c in exported["categories"]] == list(ds.label_to_category_id[1:])
    assert not [k for k in exported["model"] if k.endswith("num_batches_tracked")]
    raw = torch.load(ckpt, weights_only=False)["model"]
    assert all(torch.equal(v, raw[k]) for k, v in exported["model"].items())
    assert sorted(exported["model"]) == sorted(k for k in raw if not k.endswith("num_batches_tracked"))


def test_bad_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert export.main(["--checkpoint", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'junk.pt'}: not a readable hvd_megdet checkpoint") and "\n" not in err
    assert not (tmp_path / "m.pt").exists()


def test_readme_shows_the_tested_lines():
    """docs/after_training.md carries LOAD_SNIPPET verbatim, so the lines people copy are the lines tested above."""
    assert f"```python\n{export.LOAD_SNIPPET}```" in (ROOT / "docs" / "after_training.md").read_text()
