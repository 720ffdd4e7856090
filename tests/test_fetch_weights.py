"""hvd_megdet.tools.fetch_weights, offline: local files and file:// URLs stand in for download.pytorch.org."""
import hashlib
import os
from pathlib import Path

import pytest
import yaml

from hvd_megdet.tools import fetch_weights
from hvd_megdet.config import ModelConfig
from hvd_megdet.comm import DistContext
from hvd_megdet.model import build_model

ROOT = Path(__file__).resolve().parent.parent


def _published(directory: Path, arch: str = "resnet18", content: bytes = b"weights " * 1000) -> Path:
    """A file named as torchvision names its weights: <arch>-<first 8 hex digits of its SHA-256>.pth."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{arch}-{hashlib.sha256(content).hexdigest()[:8]}.pth"
    path.write_bytes(content)
    return path


def test_hash_prefix_of_torchvision_names():
    assert fetch_weights.hash_prefix("resnet50-0676ba61.pth") == "0676ba61"
    with pytest.raises(ValueError, match="no SHA-256 prefix"):
        fetch_weights.hash_prefix("resnet50.pth")


def test_the_configs_name_the_files_this_fetches():
    names = {Path(url).name for url in fetch_weights.WEIGHTS.values()}
    used = {yaml.safe_load(p.read_text())["model"]["backbone_weights"] for p in (ROOT / "configs").glob("*.yaml")}
    used.discard("")
    assert used and {Path(u).name for u in used} <= names
    assert {Path(u).parent.as_posix() for u in used} == {fetch_weights.DEFAULT_OUT}


@pytest.mark.parametrize("as_url", [True, False])
def test_fetch_checks_the_hash_and_writes_the_file(tmp_path, as_url):
    source = _published(tmp_path / "mirror")
    url = source.as_uri() if as_url else str(source)
    got = fetch_weights.fetch(url, tmp_path / "out")
    assert got == tmp_path / "out" / source.name and got.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [source.name]  # no temporary left


def test_a_wrong_hash_writes_nothing_and_keeps_what_was_there(tmp_path):
    bad = tmp_path / "mirror" / "resnet50-0676ba61.pth"
    bad.parent.mkdir()
    bad.write_bytes(b"not the published file")
    with pytest.raises(fetch_weights.HashMismatch, match="does not start with 0676ba61"):
        fetch_weights.fetch(bad.as_uri(), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    # A damaged file already in place is not replaced by another damaged one (nor half-written).
    (tmp_path / "out" / bad.name).write_bytes(b"old bytes")
    with pytest.raises(fetch_weights.HashMismatch):
        fetch_weights.fetch(bad.as_uri(), tmp_path / "out")
    assert [p.read_bytes() for p in (tmp_path / "out").iterdir()] == [b"old bytes"]


def test_a_good_file_in_place_is_kept_and_a_bad_one_replaced(tmp_path):
    source = _published(tmp_path / "mirror")
    out = tmp_path / "out"
    target = fetch_weights.fetch(str(source), out)
    os.utime(target, (1, 1))
    fetch_weights.fetch(str(source), out)
    assert target.stat().st_mtime == 1  # hash matched: not fetched again
    target.write_bytes(b"truncated")
    fetch_weights.fetch(str(source), out)
    assert target.read_bytes() == source.read_bytes()


def test_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    good = _published(tmp_path / "mirror")
    bad = tmp_path / "mirror" / "resnet34-b627a593.pth"
    bad.write_bytes(b"junk")
    assert fetch_weights.main(["--out", str(tmp_path / "out"), "--url", good.as_uri()]) == 0
    assert f"model.backbone_weights: {tmp_path / 'out' / good.name}" in capsys.readouterr().out
    assert fetch_weights.main(["--out", str(tmp_path / "out2"), "--url", bad.as_uri(), good.as_uri()]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad.as_uri()}: SHA-256 ")
    assert [p.name for p in (tmp_path / "out2").iterdir()] == [good.name]  # the good one still arrives
    missing = (tmp_path / "nowhere" / "resnet50-0676ba61.pth").as_uri()
    assert fetch_weights.main(["--out", str(tmp_path / "out3"), "--url", missing]) == 1
    assert capsys.readouterr().err.startswith(f"error: {missing}: download failed")


def test_training_without_the_file_names_this_command(tmp_path):
    cfg = ModelConfig(backbone="resnet18", backbone_weights=str(tmp_path / "pretrained" / "resnet18-f37072fd.pth"))
    with pytest.raises(FileNotFoundError) as err:
        build_model(cfg, DistContext(), num_classes=3, min_size=64, max_size=96)
    assert f"python -m hvd_megdet.tools.fetch_weights --out {tmp_path / 'pretrained'}" in str(err.value)


def test_a_fetched_file_is_what_model_backbone_weights_loads(tmp_path):
    """The round trip a user makes: fetch (here from a local copy), then train with it."""
    import io

    import torch
    import torchvision

    buffer = io.BytesIO()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), buffer)
    source = _published(tmp_path / "mirror", "resnet18", buffer.getvalue())
    path = fetch_weights.fetch(source.as_uri(), tmp_path / "pretrained")
    model = build_model(ModelConfig(backbone="resnet18", backbone_weights=str(path)), DistContext(),
                        num_classes=3, min_size=64, max_size=96)
    expected = torch.load(source, weights_only=True)["layer1.0.conv1.weight"]
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, expected)
