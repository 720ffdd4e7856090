"""hvd_megdet.checkpoint: atomic writes, the last K kept, temporary files ignored, clear load errors."""
import pytest
import torch

from hvd_megdet import checkpoint


def test_save_keeps_the_last_k_and_latest_is_the_highest_iteration(tmp_path):
    for it in (5, 10, 15, 20):
        checkpoint.save_checkpoint({"it": it}, tmp_path, it, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000015.pt", "ckpt_00000020.pt"]
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path)) == {"it": 20}


def test_half_written_files_are_ignored_and_cleaned_by_the_next_save(tmp_path):
    checkpoint.save_checkpoint({"it": 1}, tmp_path, 1, keep=3)
    stale = tmp_path / "checkpoints" / ".ckpt_00000002.pt.tmp.4242"  # a writer killed mid-save
    stale.write_bytes(b"\x80partial")
    assert checkpoint.latest_checkpoint(tmp_path).name == "ckpt_00000001.pt"
    checkpoint.save_checkpoint({"it": 3}, tmp_path, 3, keep=3)
    assert not stale.exists()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_00000001.pt", "ckpt_00000003.pt"]


def test_no_checkpoint_and_unreadable_checkpoint(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path) is None
    bad = tmp_path / "checkpoints" / "ckpt_00000007.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="ckpt_00000007.pt: not a readable hvd_megdet checkpoint"):
        checkpoint.load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    expected = torch.rand(3)
    torch.rand(5)  # move on
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
